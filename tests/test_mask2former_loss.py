"""The SeMask-Mask2Former set criterion against the reference's stored losses
(golden/mask2former): the stored predictions and point draws are replayed, so
the matching, the importance sampling and every loss term are checked without
the model."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semask_jax.losses import mask2former as ml
from semask_jax.models.sampling import bilinear_sample
from tests.golden_utils import m2f_golden_files

FILES = m2f_golden_files()
EXTRA_SLOTS = 2  # padded target slots beyond the classes present


def _config(meta, max_targets: int) -> ml.CriterionConfig:
  c = meta["config"]
  names = ["num_classes", "train_num_points", "oversample_ratio", "importance_sample_ratio",
           "class_weight", "mask_weight", "dice_weight", "cate_weight", "no_object_weight"]
  return ml.CriterionConfig(max_targets=max_targets, **{k: c[k] for k in names})


@functools.lru_cache(maxsize=None)
def _case(path):
  """(arrays, cfg, outputs, label, draws in the static [B, T] slot layout)."""
  vec = dict(np.load(path))  # (no weights needed: load_vector would rebuild them)
  meta = json.loads(str(vec.pop("meta")))
  n_pred, b = vec["pred_logits"].shape[:2]
  label = vec["label"]
  t = max(len(np.setdiff1d(np.unique(x), [255])) for x in label) + EXTRA_SLOTS
  cfg = _config(meta, t)
  classes, _, _ = ml.present_classes(jnp.asarray(label), cfg.num_classes, t)
  rng = np.random.default_rng(0)  # padded slots: any draw (they must not matter)
  over = rng.random((n_pred, b, t, cfg.num_oversampled, 2), dtype=np.float32)
  rand = rng.random((n_pred, b, t, cfg.num_random, 2), dtype=np.float32)
  for l in range(n_pred):
    row = 0
    for i in range(b):
      queries, targets = vec[f"match_{l}_{i}"]
      # The reference's pairs are in (image, query) order; slot = the target index.
      for q_rank, tgt in enumerate(targets):
        over[l, i, tgt] = vec[f"loss_oversampled_points_{l}"][row + q_rank]
        rand[l, i, tgt] = vec[f"loss_random_points_{l}"][row + q_rank]
      row += len(targets)
    assert row == len(vec[f"loss_oversampled_points_{l}"])
  match_points = np.stack([vec[f"match_points_{l}"] for l in range(n_pred)])
  draws = ml.CriterionDraws(jnp.asarray(match_points), jnp.asarray(over), jnp.asarray(rand))
  outputs = {"pred_logits": jnp.asarray(vec["pred_logits"]),
             "pred_masks": jnp.asarray(vec["pred_masks"]),
             "sem_pred": jnp.asarray(vec["sem_pred"].transpose(0, 2, 3, 1))}  # NCHW -> NHWC
  return vec, cfg, outputs, jnp.asarray(label), draws, np.asarray(classes)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_targets(path):
  vec, cfg, _, label, _, _ = _case(path)
  classes, masks, valid = ml.make_targets(label, cfg.num_classes, cfg.max_targets)
  classes, masks, valid = map(np.asarray, (classes, masks, valid))
  for i, lab in enumerate(vec["label"]):
    present = np.setdiff1d(np.unique(lab), [255])
    n = len(present)
    np.testing.assert_array_equal(classes[i, :n], present)
    assert valid[i, :n].all() and not valid[i, n:].any()
    np.testing.assert_array_equal(masks[i, :n], lab[None] == present[:, None, None])
    assert not masks[i, n:].any()
  # Sampling the label directly = bilinear_sample of the mask maps (both point layouts).
  pts = jax.random.uniform(jax.random.key(1), (label.shape[0], 300, 2), minval=-0.05,
                           maxval=1.05)
  ref = bilinear_sample(jnp.moveaxis(jnp.asarray(masks), 1, -1), pts)  # [B, N, T]
  got = ml.sample_label_masks(label, jnp.asarray(classes), pts)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-6)
  per_slot = jnp.broadcast_to(pts[:, None], (label.shape[0], cfg.max_targets, 300, 2))
  got = ml.sample_label_masks(label, jnp.asarray(classes), per_slot)
  np.testing.assert_allclose(np.asarray(got), np.moveaxis(np.asarray(ref), 1, 2), atol=1e-6)


def test_too_many_classes():
  label = jnp.asarray(np.arange(16, dtype=np.int32).reshape(1, 4, 4))
  with pytest.raises(ValueError, match="max_targets"):
    ml.make_targets(label, 20, 8)
  classes, valid, count = jax.jit(ml.present_classes, static_argnums=(1, 2))(label, 20, 8)
  np.testing.assert_array_equal(np.asarray(classes), np.arange(8)[None])
  assert bool(valid.all()) and int(count[0]) == 16


def test_slot_settings_are_checked():
  for name in ("max_targets", "slot_chunk"):
    with pytest.raises(ValueError, match=f"config.loss.{name} must be >= 1, got 0"):
      ml.CriterionConfig(num_classes=3, **{name: 0})


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_matching_replays_reference(path):
  vec, cfg, outputs, label, draws, _ = _case(path)
  classes, valid, _ = ml.present_classes(label, cfg.num_classes, cfg.max_targets)
  fn = jax.jit(jax.vmap(functools.partial(ml.match, cfg=cfg),
                        in_axes=(0, 0, None, None, None, 0)))
  query = np.asarray(fn(outputs["pred_logits"], outputs["pred_masks"], label, classes, valid,
                        draws.match_points))
  valid = np.asarray(valid)
  for l in range(query.shape[0]):
    for i in range(query.shape[1]):
      ref_q, ref_t = vec[f"match_{l}_{i}"]
      got_t = np.flatnonzero(valid[i])
      got_q = query[l, i, got_t]
      order = np.argsort(got_q)
      np.testing.assert_array_equal(got_q[order], ref_q, err_msg=f"prediction {l} image {i}")
      np.testing.assert_array_equal(got_t[order], ref_t, err_msg=f"prediction {l} image {i}")
      assert np.all(query[l, i, ~valid[i]] == -1)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_importance_sampling_replays_reference(path):
  vec, cfg, _, _, _, _ = _case(path)
  n_pred, b = vec["pred_logits"].shape[:2]
  fn = jax.jit(functools.partial(ml.importance_points, num_uncertain=cfg.num_uncertain))
  same = total = 0
  for l in range(n_pred):
    src = np.concatenate([vec["pred_masks"][l, i, vec[f"match_{l}_{i}"][0]] for i in range(b)])
    got = np.asarray(fn(jnp.asarray(src), jnp.asarray(vec[f"loss_oversampled_points_{l}"]),
                        jnp.asarray(vec[f"loss_random_points_{l}"])))
    ref = vec[f"loss_points_{l}"]
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got[:, cfg.num_uncertain:], ref[:, cfg.num_uncertain:])
    for g, r in zip(got[:, :cfg.num_uncertain], ref[:, :cfg.num_uncertain]):
      # Same set of points (the order of equally uncertain points may differ).
      rs = {tuple(p) for p in r}
      same += sum(tuple(p) in rs for p in g)
      total += len(g)
  assert same >= 0.99 * total, (same, total)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_losses_replay_reference(path):
  vec, cfg, outputs, label, draws, _ = _case(path)
  total, aux = jax.jit(functools.partial(ml.set_criterion, cfg=cfg))(outputs, label,
                                                                     draws=draws)
  n_pred = vec["pred_logits"].shape[0]
  for name in ["ce", "mask", "dice", "cate"]:
    ref = np.array([vec[f"loss_{name}_{l}"] for l in range(n_pred)])
    np.testing.assert_allclose(np.asarray(aux[f"loss_{name}"]), ref, rtol=1e-4, atol=0,
                               err_msg=name)
  np.testing.assert_allclose(float(total), float(vec["loss_total"]), rtol=1e-4)
  n_targets = sum(len(vec[f"match_{n_pred - 1}_{i}"][0]) for i in range(label.shape[0]))
  assert float(aux["num_masks"]) == n_targets
  assert not np.asarray(aux["num_dropped_targets"]).any()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_padded_slots_do_not_matter(path):
  """Other draws in the padded slots, and other values in the padded slots' default
  query, change nothing."""
  vec, cfg, outputs, label, draws, classes = _case(path)
  fn = jax.jit(functools.partial(ml.set_criterion, cfg=cfg))
  total, aux = fn(outputs, label, draws=draws)
  pad = classes < 0  # [B, T]
  assert pad.any()
  key = jax.random.key(3)
  other = ml.draw_points(key, *vec["pred_logits"].shape[:2], cfg)
  mix = lambda a, o: jnp.where(jnp.asarray(pad)[None, :, :, None, None], o, a)
  draws2 = draws._replace(oversampled_points=mix(draws.oversampled_points,
                                                 other.oversampled_points),
                          random_points=mix(draws.random_points, other.random_points))
  total2, aux2 = fn(outputs, label, draws=draws2)
  assert float(total2) == float(total)
  np.testing.assert_array_equal(np.asarray(aux2["matches"]), np.asarray(aux["matches"]))
  assert np.all(np.asarray(aux["matches"])[:, pad] == -1)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_slot_chunks_give_the_same_losses_and_skip_empty_chunks(path, monkeypatch):
  """The mask losses over chunks of 1 and 3 slots (a padded last chunk) equal one chunk of
  all the slots, gradients included. A chunk where no image has a target is not computed
  (its importance sampling never runs)."""
  _, cfg, outputs, label, draws, classes = _case(path)
  t = cfg.max_targets

  def run(chunk, draws=None, key=None):
    c = dataclasses.replace(cfg, slot_chunk=chunk)
    f = lambda o: ml.set_criterion(o, label, c, draws=draws, key=key)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, has_aux=True))(outputs)

  (ref, aux_ref), g_ref = run(t, draws)
  for chunk in (1, 3):
    (got, aux), g = run(chunk, draws)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6, err_msg=str(chunk))
    for name in ("mask", "dice"):
      np.testing.assert_allclose(np.asarray(aux[f"loss_{name}"]),
                                 np.asarray(aux_ref[f"loss_{name}"]), rtol=1e-6)
    for name in g_ref:
      np.testing.assert_allclose(np.asarray(g[name]), np.asarray(g_ref[name]), rtol=1e-5,
                                 atol=1e-9, err_msg=f"{chunk} {name}")
  # Keyed: every computed chunk draws its own points; finite.
  (k1, _), gk = run(1, key=jax.random.key(0))
  assert np.isfinite(float(k1))
  assert all(np.isfinite(np.asarray(v)).all() for v in gk.values())

  # Which chunks run: the importance sampling reports each run (from inside the graph).
  runs = []
  real = ml.importance_points

  def reported(mask_logits, *args):
    jax.debug.callback(lambda: runs.append(1))
    return real(mask_logits, *args)

  monkeypatch.setattr(ml, "importance_points", reported)
  c1 = dataclasses.replace(cfg, slot_chunk=1)
  jax.block_until_ready(jax.jit(functools.partial(ml.set_criterion, cfg=c1))(
      outputs, label, draws=draws))
  jax.effects_barrier()
  used = (classes >= 0).any(0)  # [T]: slots with a target in some image
  assert used.sum() < t
  assert len(runs) == outputs["pred_logits"].shape[0] * int(used.sum())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_keyed_criterion_gradients(path):
  """With draws from a key: finite loss and gradients, no gradient to unmatched
  queries' masks, gradients to every prediction's logits."""
  _, cfg, outputs, label, _, _ = _case(path)

  @jax.jit
  def loss_and_grad(outs, key):
    return jax.value_and_grad(lambda o: ml.set_criterion(o, label, cfg, key=key), has_aux=True)(
        outs)

  (total, aux), grads = loss_and_grad(outputs, jax.random.key(0))
  assert np.isfinite(float(total))
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).sum() > 0, name
  matches = np.asarray(aux["matches"])  # [L1, B, T]
  mask_grad = np.abs(np.asarray(grads["pred_masks"])).sum((-1, -2))  # [L1, B, Q]
  for l in range(matches.shape[0]):
    for i in range(matches.shape[1]):
      used = set(matches[l, i][matches[l, i] >= 0].tolist())
      for q in range(mask_grad.shape[2]):
        assert (mask_grad[l, i, q] > 0) == (q in used), (l, i, q)
  assert np.abs(np.asarray(grads["pred_logits"])).sum((1, 2, 3)).min() > 0
  # A different key: other points, still finite.
  (total2, _), _ = loss_and_grad(outputs, jax.random.key(1))
  assert np.isfinite(float(total2)) and float(total2) != float(total)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_batch_sharded(path):
  """Batch split over devices: the same losses (num_masks counts the global batch)."""
  vec, cfg, outputs, label, draws, _ = _case(path)
  b = label.shape[0]
  if len(jax.devices()) < b:
    pytest.skip("needs one device per image")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:b]), ("data",))
  spec = lambda axis, ndim: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*[("data" if i == axis else None) for i in range(ndim)]))
  put = lambda x, axis: jax.device_put(x, spec(axis, x.ndim))
  outputs = {"pred_logits": put(outputs["pred_logits"], 1),
             "pred_masks": put(outputs["pred_masks"], 1), "sem_pred": put(outputs["sem_pred"], 0)}
  draws = ml.CriterionDraws(*[put(d, 1) for d in draws])
  n_targets = sum(len(vec[f"match_0_{i}"][0]) for i in range(b))
  # One chunk of slots, and one slot a chunk (whether to skip a chunk: any image, any device).
  for c in (cfg, dataclasses.replace(cfg, slot_chunk=1)):
    total, aux = jax.jit(functools.partial(ml.set_criterion, cfg=c))(outputs, put(label, 0),
                                                                     draws=draws)
    np.testing.assert_allclose(float(total), float(vec["loss_total"]), rtol=1e-4)
    assert float(aux["num_masks"]) == n_targets


def test_loss_ce_and_cate_are_per_group_means_as_the_reference_per_gpu():
  """group_size=2 over 4 images = the mean of the two pairs' own losses (the reference's
  per-GPU means averaged by DDP); the cate term checked against torch's cross_entropy."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  n_pred, b, q, k, h, w = 2, 4, 5, 6, 16, 16
  rng = np.random.default_rng(3)
  label = rng.integers(0, k, (b, h, w)).astype(np.int32)
  label[0, :12] = 255       # unequal ignored counts: a pooled mean would differ
  label[2, :, :3] = 255
  label[3] = np.where(label[3] > 2, 255, label[3])  # fewer classes in one image
  outputs = {"pred_logits": jnp.asarray(rng.normal(size=(n_pred, b, q, k + 1)), jnp.float32),
             "pred_masks": jnp.asarray(rng.normal(size=(n_pred, b, q, h // 4, w // 4)),
                                       jnp.float32),
             "sem_pred": jnp.asarray(rng.normal(size=(b, h, w, k)), jnp.float32)}
  base = ml.CriterionConfig(num_classes=k, max_targets=k, train_num_points=32)
  draws = ml.draw_points(jax.random.key(0), n_pred, b, base)

  def run(cfg, idx):
    sub = {name: (v[idx] if name == "sem_pred" else v[:, idx]) for name, v in outputs.items()}
    d = ml.CriterionDraws(*(x[:, idx] for x in draws))
    _, aux = ml.set_criterion(sub, jnp.asarray(label[idx]), cfg, draws=d)
    return {name: np.asarray(aux[name]) for name in ("loss_ce", "loss_cate")}

  grouped = run(dataclasses.replace(base, group_size=2), np.arange(4))
  pairs = [run(base, np.arange(2 * i, 2 * i + 2)) for i in range(2)]
  pooled = run(base, np.arange(4))
  for name in ("loss_ce", "loss_cate"):
    np.testing.assert_allclose(grouped[name], (pairs[0][name] + pairs[1][name]) / 2, rtol=1e-6)
    assert not np.allclose(grouped[name][-1], pooled[name][-1], rtol=1e-4), name
  sem = torch.tensor(np.asarray(outputs["sem_pred"])).permute(0, 3, 1, 2)
  lab = torch.from_numpy(label).long()
  want = np.mean([F.cross_entropy(sem[i:i + 2], lab[i:i + 2], ignore_index=255).item()
                  for i in (0, 2)])
  np.testing.assert_allclose(grouped["loss_cate"][-1], want, rtol=1e-5)
  with pytest.raises(ValueError, match="group_size=3 does not divide"):
    run(dataclasses.replace(base, group_size=3), np.arange(4))
