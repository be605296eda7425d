"""Initialisation against the reference's, entry by entry (SPEC section 13, issue 27).

Data-driven: every *.json in $SEMASK_INIT_GOLDEN_DIR (default ../shared/golden/init) holds
the measured distribution of every state-dict entry of a freshly built official model
(mmseg SeMask-FPN or detectron2 SeMask-Mask2Former). The model of the file's `config` is
built here with this project's init and compared, per entry, in the reference layout:

  * the same shape; every entry of the file has a counterpart here, and every parameter
    here an entry there; the buffers without a parameter are handled in BUFFERS;
  * deterministic entries: the same constant, or the same values within 1e-6 (large
    non-constant ones: the same sha256, else mean / std / min / max within 1e-6);
  * random entries: the same family (uniform / normal, n >= 200), the mean within 4
    standard errors of the difference, the std within 3 % for 10,000+ elements, else
    within 8 % or 4 standard errors of the difference of two sample stds, whichever is
    larger (two independent samples of ~100 uniforms have stds ~6.5 % apart, one SE:
    8 % alone fails by chance), and frac_zero within 1e-3;
  * the same "shared across layers" structure: random entries here are bit-identical
    copies of each other exactly where the file says so (identical_to).

A file for another variant or class count of the same schema runs with no code change.
`python -m tests.test_init` (from the repo root) prints the worst deviations per module kind.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from convert_weights import names
from semask_jax.losses import mask2former as mask2former_loss
from semask_jax.models import build_model, default_model_config, layers, model_config_from_dict
from semask_jax.models.windows import relative_position_index

INIT_GOLDEN_DIR = pathlib.Path(os.environ.get(
    "SEMASK_INIT_GOLDEN_DIR",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "init"))
FILES = sorted(INIT_GOLDEN_DIR.glob("*.json"))
SEED = 0

MEAN_SE = 4.0            # mean: within this many standard errors of the difference
STD_RTOL_LARGE = 0.03    # std, tensors of LARGE elements or more
STD_RTOL_SMALL = 0.08    # std, smaller tensors (or STD_SE standard errors if larger)
STD_SE = 4.0
LARGE = 10_000
FRAC_ZERO_ATOL = 1e-3
DET_ATOL = 1e-6
FAMILY_MIN_N = 200       # the files' rule: no family below 200 elements

# Reference state-dict entries that are no parameter here: each is checked another way.
BUFFERS = {
    "relative_position_index":
        "a buffer recomputed here from the window size (windows.relative_position_index): "
        "compared with it",
    "num_batches_tracked":
        "BatchNorm's step counter, only read by momentum=None; BatchNorm here has a fixed "
        "momentum and keeps no counter: the reference's must be 0",
    "criterion.empty_weight":
        "the criterion's class weights, a buffer of the loss: compared with "
        "CriterionConfig.empty_weight, which the loss uses",
}


def _buffer_reason(key: str) -> str | None:
  for suffix, reason in BUFFERS.items():
    if key == suffix or key.endswith("." + suffix):
      return reason
  return None


def load(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


def build(meta: dict, seed: int = SEED, **overrides) -> nnx.Module:
  cfg = model_config_from_dict(meta["config"])
  for k, v in overrides.items():
    cfg[k] = v
  return build_model(cfg, rngs=nnx.Rngs(seed))


def reference_layout(model: nnx.Module) -> dict[str, np.ndarray]:
  """torch key -> this model's value in the reference layout (Params and BatchStats)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    out[names.torch_key(path)] = names.to_torch_layout(path, np.asarray(var[...]))
  return out


def buffer_value(key: str, entry: dict, meta: dict) -> np.ndarray:
  """This project's value of a reference buffer (BUFFERS)."""
  if key.endswith("relative_position_index"):
    m = math.isqrt(entry["shape"][0])
    return relative_position_index(m).astype(np.int64)
  if key.endswith("num_batches_tracked"):
    return np.zeros((), np.int64)  # no counter: BatchNorm here starts where torch's does
  if key == "criterion.empty_weight":
    c = meta["config"]
    return mask2former_loss.CriterionConfig(
        num_classes=c["num_classes"], no_object_weight=c["no_object_weight"]).empty_weight
  raise KeyError(key)


def family(x: np.ndarray) -> str:
  """uniform / normal / other by excess kurtosis and max |x| / std (the files' rule:
  excess kurtosis 0 for a normal, -1.2 for a uniform, whose max |x| / std is sqrt 3)."""
  if x.size < FAMILY_MIN_N:
    return "undetermined (n < 200)"
  x = x.astype(np.float64).ravel()
  c = x - x.mean()
  std = math.sqrt(np.mean(c * c))
  if std == 0:
    return "other"
  kurt = np.mean(c ** 4) / std ** 4 - 3.0
  ratio = np.abs(x).max() / std
  if kurt < -0.9 and ratio < 1.9:
    return "uniform"
  if abs(kurt) < 1.0 and ratio > 2.2:
    return "normal"
  return "other"


def module_kind(key: str) -> str:
  """The entry's kind: its key with indices as * (the files' summary keys)."""
  return re.sub(r"\.\d+(?=\.|$)", ".*", key)


@dataclasses.dataclass
class Check:
  """One entry's comparison: the deviations (for the report) and what failed."""
  key: str
  kind: str                   # 'random', 'deterministic' or 'buffer'
  numel: int
  mean_se: float = 0.0        # |mean difference| / its standard error
  std_rel: float = 0.0        # |std / ref std - 1|
  std_tol: float = 0.0
  frac_zero: float = 0.0      # |frac_zero difference|
  det_abs: float = 0.0        # max |difference| of a deterministic entry
  errors: list[str] = dataclasses.field(default_factory=list)


def _raw_hash(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
                        ).hexdigest()


def check_deterministic(key: str, x: np.ndarray, e: dict, check: Check) -> None:
  ref_dtype = np.dtype(e["dtype"])
  if "constant" in e:
    dev = float(np.max(np.abs(x.astype(np.float64) - e["constant"]))) if x.size else 0.0
  elif "values" in e:
    dev = float(np.max(np.abs(x.astype(np.float64).ravel() - np.asarray(e["values"], np.float64))))
  else:  # numel > 4096, non-constant: the raw bytes' hash, else the statistics
    if _raw_hash(x.astype(ref_dtype)) == e["sha256"]:
      dev = 0.0
    else:
      x64 = x.astype(np.float64)
      dev = max(abs(x64.mean() - e["mean"]), abs(x64.std() - e["std"]),
                abs(x64.min() - e["min"]), abs(x64.max() - e["max"]))
  check.det_abs = dev
  tol = 0 if np.issubdtype(ref_dtype, np.integer) else DET_ATOL
  if not dev <= tol:
    check.errors.append(f"deterministic entry off by {dev:.3g} (tolerance {tol})")


def check_random(key: str, x: np.ndarray, e: dict, check: Check) -> None:
  x64 = x.astype(np.float64).ravel()
  n = x64.size
  mean, std = x64.mean(), x64.std()
  ref_mean, ref_std = e["mean"], e["std"]
  se = math.sqrt((ref_std ** 2 + std ** 2) / n)
  check.mean_se = abs(mean - ref_mean) / se if se > 0 else math.inf
  if not check.mean_se <= MEAN_SE:
    check.errors.append(f"mean {mean:.4g} vs {ref_mean:.4g}: {check.mean_se:.1f} SE")
  if n >= LARGE:
    tol = STD_RTOL_LARGE
  else:  # SE of a sample std: std sqrt((kurt + 2) / 4n); two independent samples
    kurt = max(e.get("excess_kurtosis", 0.0), -2.0)
    tol = max(STD_RTOL_SMALL, STD_SE * math.sqrt(2 * (kurt + 2) / (4 * n)))
  check.std_tol = tol
  check.std_rel = abs(std / ref_std - 1) if ref_std > 0 else math.inf
  if not check.std_rel <= tol:
    check.errors.append(f"std {std:.4g} vs {ref_std:.4g} ({check.std_rel:.1%} > {tol:.1%})")
  check.frac_zero = abs(float(np.mean(x64 == 0)) - e["frac_zero"])
  if not check.frac_zero <= FRAC_ZERO_ATOL:
    check.errors.append(f"frac_zero {np.mean(x64 == 0):.4g} vs {e['frac_zero']:.4g}")
  ours = family(x)
  if e["family"] != ours and not e["family"].startswith("undetermined"):
    check.errors.append(f"family {ours} vs {e['family']}")


def compare(meta: dict, values: dict[str, np.ndarray]) -> tuple[list[Check], list[str]]:
  """Every entry of the file against `values` (torch key -> reference layout).

  Returns the per-entry checks and the file-level errors (coverage, shared structure)."""
  entries = meta["entries"]
  checks, errors = [], []
  extra = sorted(set(values) - set(entries))
  if extra:
    errors.append(f"parameters here with no reference entry: {extra}")
  for key, e in entries.items():
    reason = _buffer_reason(key)
    if key in values:
      x = values[key]
    elif reason is not None:
      x = buffer_value(key, e, meta)
    else:
      errors.append(f"{key}: no counterpart here (and not a known buffer)")
      continue
    check = Check(key, "buffer" if reason else e["kind"], int(e["numel"]))
    checks.append(check)
    if list(x.shape) != list(e["shape"]):
      check.errors.append(f"shape {list(x.shape)} vs {e['shape']}")
      continue
    if e["kind"] == "deterministic":
      check_deterministic(key, x, e, check)
    else:
      check_random(key, x, e, check)
  # Shared structure: the groups of bit-identical random entries must be the file's.
  random_keys = [k for k, e in entries.items() if e["kind"] == "random" and k in values]
  by_hash = collections.defaultdict(set)
  for k in random_keys:
    by_hash[(values[k].shape, _raw_hash(values[k].astype(np.float32)))].add(k)
  ours = {k: g for g in by_hash.values() for k in g}
  for k in random_keys:
    theirs = {k} | set(entries[k].get("identical_to", ()))
    if ours[k] != theirs:
      errors.append(f"{k}: bit-identical here to {sorted(ours[k] - {k})}, in the reference "
                    f"to {sorted(theirs - {k})}")
  return checks, errors


def worst_by_kind(checks: list[Check]) -> list[str]:
  """A table of the worst deviations per module kind (the files' summary keys)."""
  groups = collections.defaultdict(list)
  for c in checks:
    groups[module_kind(c.key)].append(c)
  lines = [f"{'module kind':<86} {'n':>3} {'mean/SE':>8} {'std dev':>8} {'(tol)':>7} "
           f"{'frac0':>7} {'det |d|':>9}"]
  for kind, cs in groups.items():
    random = [c for c in cs if c.kind == "random"]
    det = [c for c in cs if c.kind != "random"]
    if random:
      w = max(random, key=lambda c: c.std_rel / c.std_tol)
      lines.append(f"{kind:<86} {len(cs):>3} {max(c.mean_se for c in random):>8.2f} "
                   f"{w.std_rel:>8.2%} {w.std_tol:>7.1%} "
                   f"{max(c.frac_zero for c in random):>7.1e} {'':>9}")
    else:
      lines.append(f"{kind:<86} {len(cs):>3} {'':>8} {'':>8} {'':>7} {'':>7} "
                   f"{max(c.det_abs for c in det):>9.1e}")
  return lines


@pytest.fixture(scope="module", params=FILES, ids=[f.stem for f in FILES])
def golden(request):
  meta = load(request.param)
  return meta, reference_layout(build(meta))


def test_files_found():
  assert FILES, f"no *.json in {INIT_GOLDEN_DIR} (set SEMASK_INIT_GOLDEN_DIR)"


def test_init_matches_reference(golden):
  meta, values = golden
  checks, errors = compare(meta, values)
  print(f"\n{meta['name']}: worst deviations per module kind")
  print("\n".join(worst_by_kind(checks)))
  buffers = sorted({module_kind(c.key) for c in checks if c.kind == "buffer"})
  print("reference buffers without a parameter here: " + "; ".join(buffers))
  failed = [f"{c.key}: {'; '.join(c.errors)}" for c in checks if c.errors] + errors
  assert not failed, f"{len(failed)} entries differ from the reference init:\n" + "\n".join(failed)
  assert len(checks) == len(meta["entries"]) == meta["state_dict_entries"]


def test_compare_catches_wrong_inits(golden):
  """The comparison is not vacuous: a wrong scale, a zeroed tensor, a uniform for a
  normal, a per-layer draw for a shared one and a missing entry are all reported."""
  meta, values = golden
  entries = meta["entries"]
  rng = np.random.default_rng(0)
  random_keys = [k for k, e in entries.items() if e["kind"] == "random" and e["numel"] >= 1000]
  normal_key = next(k for k in random_keys if entries[k]["family"] == "normal")
  uniform_key = next(k for k in random_keys if entries[k]["family"] == "uniform")
  det_key = next(k for k, e in entries.items() if e["kind"] == "deterministic" and k in values)
  # Compared on a few entries (and their shared copies), for speed.
  shared = [k for k, e in entries.items() if e.get("identical_to")][:1]
  keys = {normal_key, uniform_key, det_key, *shared,
          *(c for k in shared for c in entries[k]["identical_to"])}
  sub = {**meta, "entries": {k: entries[k] for k in keys}}
  sub_values = {k: values[k] for k in keys}
  checks, errors = compare(sub, sub_values)
  assert not errors and not any(c.errors for c in checks)
  for key, bad in [
      (uniform_key, values[uniform_key] * 1.2),                       # 20 % too wide
      (uniform_key, np.zeros_like(values[uniform_key])),
      (normal_key, rng.uniform(-1, 1, values[normal_key].shape) * entries[normal_key]["std"]
       * math.sqrt(3)),                                               # same std, uniform
      (det_key, values[det_key] + 1e-5),
  ]:
    checks, _ = compare(sub, {**sub_values, key: bad.astype(values[key].dtype)})
    assert [c.key for c in checks if c.errors] == [key]
  if shared:
    k = shared[0]
    perturbed = values[k].copy()
    perturbed.flat[0] = np.nextafter(perturbed.flat[0], np.float32(1))
    _, errors = compare(sub, {**sub_values, k: perturbed})
    assert any(k in err for err in errors)
  _, errors = compare(sub, {k: v for k, v in sub_values.items() if k != det_key})
  assert any(det_key in err for err in errors)
  _, errors = compare(sub, {**sub_values, "backbone.extra.weight": np.zeros(3, np.float32)})
  assert any("backbone.extra.weight" in err for err in errors)


def test_init_is_deterministic_per_seed():
  """Initialisation is a function of the seed (host draws; test_init's numbers)."""
  cfg = _tiny_m2f("reference")
  a = nnx.state(build_model(cfg, rngs=nnx.Rngs(3)), nnx.Param)
  b = nnx.state(build_model(cfg, rngs=nnx.Rngs(3)), nnx.Param)
  c = nnx.state(build_model(cfg, rngs=nnx.Rngs(4)), nnx.Param)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


# ---------------------------------------------------------------------------
# model.semantic_attention_init on the Mask2Former path (SPEC 13's saddle).
# ---------------------------------------------------------------------------

def _tiny_m2f(semantic_attention_init: str, name: str = "semask_mask2former"):
  m = default_model_config("T", 5, num_sem_blocks=1 if name != "semask_fpn" else (1,) * 4,
                           name=name)
  m.update(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
           sem_window_size=4, drop_path_rate=0.0, sem_dropout=0.0,
           semantic_attention_init=semantic_attention_init)
  if name != "semask_fpn":
    m.update(conv_dim=32, mask_dim=32, hidden_dim=32, nheads=4, enc_layers=1,
             enc_dim_feedforward=32, num_queries=4, dim_feedforward=32, dec_layers=2)
  else:
    m.fpn_channels = 32
  return m


def _semantic_leaves(model: nnx.Module) -> dict[str, np.ndarray]:
  return {names.model_name(p): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
          if "class_injection" in names.model_name(p)}


@functools.partial(jax.jit, static_argnums=0)
@functools.partial(jax.grad, argnums=1)
def _backbone_grad(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
                   images: jax.Array) -> jax.Array:
  """d loss / d params of a loss of all the backbone's outputs (one compile for the
  models of the same structure)."""
  keys = layers.KeyChain(jax.random.key(2))
  feats, sems = nnx.merge(graphdef, params, rest)(images, keys)
  return (sum(jnp.mean(jnp.tanh(f) ** 2) for f in feats)
          + sum(jnp.mean(jax.nn.log_softmax(s) ** 2) for s in sems))


def _adamw_steps(model: nnx.Module, steps: int = 3):
  """`steps` AdamW updates (wd 0.05, as the detectron2 recipe) of the backbone's
  parameters under a loss that reads everything the backbone gives the heads (the four
  feature maps and the semantic maps): the gradients of each step. The saddle is inside
  the semantic layer, so whatever the heads do with these maps cannot leave it; the heads
  are left out to keep the compile short."""
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  backbone = model.backbone
  graphdef, params, rest = nnx.split(backbone, nnx.Param, ...)
  opt = optax.adamw(1e-3, weight_decay=0.05)
  opt_state = opt.init(params)
  grads_seen = []
  for _ in range(steps):
    grads = _backbone_grad(graphdef, params, rest, images)
    grads_seen.append(grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  nnx.update(backbone, params)
  return grads_seen


def _flat(tree) -> dict[str, np.ndarray]:
  return {names.model_name(p): np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
          for p, v in nnx.to_flat_state(tree)}


def test_semantic_attention_reference_init_is_frozen():
  """'reference' (the default) on the Mask2Former path: mlp_res and gamma start at 0 and
  stay exactly 0 under AdamW; mlp_cls_k and mlp_v get exactly zero gradient; mlp_cls_q
  learns (from the semantic map)."""
  model = build_model(_tiny_m2f("reference"), rngs=nnx.Rngs(0))
  before = _semantic_leaves(model)
  assert all(not before[k].any() for k in before if ".mlp_res." in k or k.endswith("gamma"))
  grads = _adamw_steps(model)
  after = _semantic_leaves(model)
  for k in after:
    if ".mlp_res." in k or k.endswith("gamma"):
      assert not after[k].any(), k
  for g in grads:
    flat = {k: v for k, v in _flat(g).items() if "class_injection" in k}
    for k, v in flat.items():
      if ".mlp_cls_k." in k or ".mlp_v." in k or ".mlp_res." in k or k.endswith("gamma"):
        assert not v.any(), f"{k} has a gradient"
    assert all(flat[k].any() for k in flat if k.endswith("mlp_cls_q.kernel"))


def test_semantic_attention_trainable_init_learns():
  """'trainable': the FPN path's init on the Mask2Former path; gamma gets a gradient at
  the first step, then mlp_res, mlp_v and mlp_cls_k do too."""
  model = build_model(_tiny_m2f("trainable"), rngs=nnx.Rngs(0))
  before = _semantic_leaves(model)
  res = [k for k in before if k.endswith("mlp_res.kernel")]
  assert all(0.015 < before[k].std() < 0.025 for k in res)  # N(0, 0.02^2)
  grads = _adamw_steps(model)
  first = _flat(grads[0])
  assert all(first[k].any() for k in first if k.endswith("gamma"))
  last = _flat(grads[-1])
  for part in ("mlp_res.kernel", "mlp_v.kernel", "mlp_cls_k.kernel", "gamma"):
    assert all(last[k].any() for k in last if k.endswith(part)), part
  after = _semantic_leaves(model)
  assert all(after[k].any() for k in after if k.endswith("gamma"))


def test_semantic_attention_init_leaves_fpn_alone():
  """The switch does not change the FPN path (the same parameters either way)."""
  a = build_model(_tiny_m2f("reference", "semask_fpn"), rngs=nnx.Rngs(0))
  b = build_model(_tiny_m2f("trainable", "semask_fpn"), rngs=nnx.Rngs(0))
  la, lb = _flat(nnx.state(a, nnx.Param)), _flat(nnx.state(b, nnx.Param))
  assert la.keys() == lb.keys() and all(np.array_equal(la[k], lb[k]) for k in la)


def test_semantic_attention_init_validated():
  with pytest.raises(ValueError, match="semantic_attention_init"):
    build_model(_tiny_m2f("frozen"), rngs=nnx.Rngs(0))


if __name__ == "__main__":
  for path in FILES:
    meta = load(path)
    checks, errors = compare(meta, reference_layout(build(meta)))
    print(f"== {path.name}: {sum(bool(c.errors) for c in checks)} entries off, "
          f"{len(errors)} file-level errors")
    print("\n".join(worst_by_kind(checks)))
    for c in checks:
      if c.errors:
        print("  FAIL", c.key, "; ".join(c.errors))
    for err in errors:
      print("  FAIL", err)
