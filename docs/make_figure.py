r"""The README's picture: the demo model on generated scenes it never saw, with its
semantic prior maps.

  python docs/make_figure.py                      # trains the demo first if workdir/demo has no checkpoint
  python docs/make_figure.py --workdir workdir/demo --out docs/figure.png

Each row: the input, the ground truth, the prediction (the evaluation's own inference),
then the argmax of each stage's semantic prior map (SeMask's semantic layers, strides 4,
8, 16 and 32) and of their sum (the semantic decoder, the alpha-weighted loss's logits),
in the data set's palette.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCALE = 2  # display pixels per image pixel
TITLE_H = 18


def _colour(class_map: np.ndarray, palette: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Class ids [h, w] -> RGB at `size` (nearest: each cell of a coarse map stays a block)."""
  from PIL import Image
  rgb = np.asarray(palette, np.uint8)[class_map]
  return np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.NEAREST))


def panels_for_scene(config, model, inference, index: int) -> list[tuple[str, np.ndarray]]:
  import jax.numpy as jnp
  import input_pipeline
  from input_pipeline import synthetic
  from semask_jax.evaluation import predict
  s = config.data.synthetic
  image, label = synthetic.generate_scene(s.seed, 'test', s.num_eval + 100 + index,
                                          height=s.height, width=s.width,
                                          num_classes=config.data.num_classes,
                                          max_objects=s.max_objects)
  palette = input_pipeline.dataset_info(config.data.name).palette
  hw = image.shape[:2]
  scaled = predict.scale_images(image, config)
  pred = inference.predict(scaled, hw)
  out = model(jnp.asarray(scaled[0])[None])
  panels = [('input', image), ('ground truth', _colour(label, palette, hw)),
            ('prediction', _colour(pred, palette, hw))]
  for i, sem in enumerate(out['sems']):
    panels.append((f'prior, stage {i + 1}', _colour(np.asarray(sem[0]).argmax(-1), palette, hw)))
  panels.append(('prior sum', _colour(np.asarray(out['cls_logits'][0]).argmax(-1), palette, hw)))
  return panels


def compose(rows: list[list[tuple[str, np.ndarray]]]) -> 'Image.Image':
  from PIL import Image, ImageDraw
  h, w = rows[0][0][1].shape[:2]
  ph, pw, gap = h * SCALE, w * SCALE, 4
  canvas = Image.new('RGB', (len(rows[0]) * (pw + gap) - gap,
                             len(rows) * (ph + TITLE_H + gap) - gap), 'white')
  draw = ImageDraw.Draw(canvas)
  for r, row in enumerate(rows):
    y = r * (ph + TITLE_H + gap)
    for c, (title, arr) in enumerate(row):
      x = c * (pw + gap)
      draw.text((x + 2, y + 3), title, fill='black')
      canvas.paste(Image.fromarray(arr).resize((pw, ph), Image.NEAREST), (x, y + TITLE_H))
  return canvas


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='workdir/demo', help="the demo's workdir (python main.py)")
  p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'figure.png'))
  p.add_argument('--scenes', type=int, default=2)
  args = p.parse_args(argv)

  import jax
  from configs import demo
  from semask_jax import sharding
  from semask_jax.evaluation import inference as inference_lib
  from semask_jax.models.functional import merge_model
  from semask_jax.train import loop, state as state_lib
  config = demo.get_config()
  if not os.path.isdir(os.path.join(args.workdir, 'checkpoints')):
    print(f'no checkpoint in {args.workdir}: training the demo (about 2 min on 2 CPU cores)')
    loop.train_and_evaluate(config, args.workdir)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state, graphdef, rest, step = state_lib.restore_for_inference(config, args.workdir, mesh)
  inference = inference_lib.make_per_image_inference(config, graphdef, rest, state.params,
                                                     state.batch_stats)
  model = merge_model(graphdef, state.params, state.batch_stats, rest)
  rows = [panels_for_scene(config, model, inference, i) for i in range(args.scenes)]
  compose(rows).save(args.out, optimize=True)
  print(f'wrote {args.out} (the demo model of step {step})')
  return args.out


if __name__ == '__main__':
  main()
