"""No dead code in the library: every top-level function and class of semask_jax,
convert_weights and input_pipeline is named somewhere else (code, tests, configs, tools
or the README)."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('semask_jax', 'convert_weights', 'input_pipeline')


def _sources() -> dict[pathlib.Path, str]:
  dirs = PACKAGES + ('tests', 'configs', 'benchmarks')
  files = [p for d in dirs for p in (ROOT / d).rglob('*.py')] + [ROOT / 'main.py']
  return {p: p.read_text() for p in files}


def test_every_top_level_function_and_class_is_used():
  sources = _sources()
  text = '\n'.join(sources.values()) + (ROOT / 'README.md').read_text()
  unused = []
  for path, source in sources.items():
    if path.relative_to(ROOT).parts[0] not in PACKAGES:
      continue
    for node in ast.parse(source).body:
      if (isinstance(node, (ast.FunctionDef, ast.ClassDef))
          and not (node.name.startswith('__') and node.name.endswith('__'))
          and len(re.findall(rf'\b{re.escape(node.name)}\b', text)) < 2):
        unused.append(f'{path.relative_to(ROOT)}: {node.name}')
  assert not unused, 'defined but never used:\n' + '\n'.join(unused)
