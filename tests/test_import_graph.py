"""The package's layers import only downwards: models <- losses <- evaluation <- train <- tools.

Every import statement of every module (top-level or inside a function) is read from
its source, so a lazy import cannot hide a cycle.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'semask_jax'

# The layer of each part of semask_jax (lower numbers are imported by higher ones).
# The base modules (errors, the device mesh, the compilation cache) are below the model.
LAYERS = {
    'cli': 0, 'bench_host': 0,
    'sharding': 0.5, 'compile_cache': 0.5,
    'models': 1,
    'losses': 2,
    'evaluation': 3,
    'train': 4,
    'bench': 5, 'eval_plan': 5,
}


def _part(module: str) -> str | None:
  """'semask_jax.losses.matching' -> 'losses'; None outside semask_jax."""
  parts = module.split('.')
  return parts[1] if parts[0] == 'semask_jax' and len(parts) > 1 else None


def _imports(path: pathlib.Path) -> set[str]:
  """The semask_jax modules a file imports (`from semask_jax import x` counts as x)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == 'semask_jax':
        out.update(f'semask_jax.{a.name}' for a in node.names)
      else:
        out.add(node.module)
  return {m for m in out if _part(m)}


def _edges() -> list[tuple[str, str, str]]:
  edges = []
  for path in sorted(ROOT.rglob('*.py')):
    rel = path.relative_to(ROOT.parent).with_suffix('')
    src = _part('.'.join(rel.parts))
    if src is None:  # semask_jax/__init__.py
      continue
    for module in sorted(_imports(path)):
      edges.append((str(rel), src, _part(module)))
  return edges


def test_every_part_has_a_layer():
  parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
           if (p.suffix == '.py' and p.stem != '__init__') or (p / '__init__.py').exists()}
  assert parts <= set(LAYERS), f'parts without a layer: {parts - set(LAYERS)}'


def test_parts_import_only_downwards():
  upward = [f'{f}: {src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})'
            for f, src, dst in _edges() if src != dst and LAYERS[dst] >= LAYERS[src]]
  assert not upward, '\n'.join(upward)


def test_models_import_nothing_above_them():
  for f, src, dst in _edges():
    if src == 'models':
      assert LAYERS[dst] <= LAYERS['models'], f'{f} imports semask_jax.{dst}'


@pytest.mark.parametrize('module,forbidden', [('semask_jax.evaluation.predict', 'evaluator')])
def test_no_cycle_between_predict_and_evaluator(module, forbidden):
  path = ROOT.parent / (module.replace('.', '/') + '.py')
  assert not any(m.endswith(forbidden) for m in _imports(path))
