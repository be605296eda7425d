"""One training step of the project against the reference's (golden/train, SPEC section 9).

Data-driven: every *.npz in $SEMASK_TRAIN_GOLDEN_DIR (default ../shared/golden/train)
is checked; the weights come from the recipe.py next to the vectors, through the
converter. The step is the project's own (`train.make_train_step` on the state of
`state.init_train_state`, one device, float32): train-mode forward with BatchNorm on
batch statistics, OHEM, the loss, the backward, the AdamW update with the no-decay
rule. The gradients come from `train.make_grad_fn`, the very function the step
differentiates, once without remat and once under every remat policy.
"""
import json
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import input_pipeline
from configs import common
from convert_weights import convert_semask, names
from semask_jax import sharding as sharding_lib
from semask_jax.train import state as state_lib
from semask_jax.train import loop as train
from semask_jax.models import layers, model_config_from_dict
from semask_jax.models.config import REMAT_POLICIES
from tests.golden_utils import GOLDEN_DIR, load_vector

TRAIN_GOLDEN_DIR = pathlib.Path(os.environ.get("SEMASK_TRAIN_GOLDEN_DIR", GOLDEN_DIR / "train"))
FILES = sorted(TRAIN_GOLDEN_DIR.glob("*.npz"))
RTOL_LOSS = 1e-4
RTOL_GRAD = 1e-4      # of max |ref grad| of the tensor
RTOL_GRAD_MODEL = 1e-6  # of max |ref grad| over the model
RTOL_BN = 1e-4
PARAM_TOL_LR = 1e-2   # |param_after error| / lr where |ref grad| > GRAD_DEFINED
PARAM_TOL_LR_NOISE = 2.0  # elsewhere: Adam's first step turns noise into a step of up to lr
GRAD_DEFINED = 1e-6


def train_config(meta: dict, *, remat: bool = False, policy: str = "full"
                 ) -> ml_collections.ConfigDict:
  """The project config of the reference step in meta['config']: model, loss, AdamW at exactly lr."""
  mc = meta["config"]
  c = common.base_config()
  c.data = ml_collections.ConfigDict({"ignore_index": 255})
  c.model = model_config_from_dict(mc)
  c.model.head_dropout = float(mc["dropout_ratio"])  # mmseg's name for the head's Dropout2d
  c.model.remat = remat
  c.model.remat_policy = policy
  c.loss.cate_w = float(mc["cate_w"])
  c.loss.reduction = "reference"
  c.loss.ohem_min_kept = mc.get("ohem_min_kept")
  c.loss.group_size = 0  # the vector is one GPU's batch: the reference selected over all of it
  o = c.optimizer
  o.learning_rate = float(mc["lr"])
  o.weight_decay = float(mc["weight_decay"])
  o.b1, o.b2 = (float(b) for b in mc["betas"])
  o.eps = float(mc["eps"])
  o.no_decay_keys = tuple(mc["no_decay_keys"])
  o.warmup_steps = 0  # poly at update 0: lr * 1 ** power = lr
  c.total_steps = 1
  c.grad_accum_steps = 1
  c.xla_cpu_fast_compile = True
  return c


def torch_named(tree) -> dict[str, np.ndarray]:
  """A pure-dict params / batch_stats tree as {torch key: array in torch layout}."""
  out = {}
  for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    p = tuple(k.key for k in path)
    out[names.torch_key(p)] = names.to_torch_layout(p, np.asarray(v))
  return out


def _model(sd, config):
  model = convert_semask(sd, config.model).model
  bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.BatchNorm)]
  assert bns  # the FPN head's
  return model


class Vector:
  """The golden arrays, their config and the project's step on them (computed once)."""

  def __init__(self, path: pathlib.Path):
    self.vec, self.meta, self.sd = load_vector(path)
    self.mc = self.meta["config"]
    self.lr = float(self.mc["lr"])
    for k in ("drop_path_rate", "dropout_ratio", "sem_dropout"):
      assert self.mc[k] == 0.0, f"{k}: the golden step must be deterministic"
    self.mesh = sharding_lib.make_mesh(jax.devices()[:1])
    self.batch = input_pipeline.make_global_batch(
        {"image": self.vec["image"].transpose(0, 2, 3, 1).astype(np.float32),
         "label": self.vec["label"].astype(np.int32)}, self.mesh)
    self.ref_grads = {k[len("grad/"):]: v for k, v in self.vec.items() if k.startswith("grad/")}
    self.grad_model_max = max(float(np.abs(g).max()) for g in self.ref_grads.values())

    config = train_config(self.meta)
    model = _model(self.sd, config)
    for _, m in nnx.iter_modules(model):
      if isinstance(m, layers.BatchNorm):
        assert m.momentum == self.mc.get("bn_momentum", 0.1) and m.eps == 1e-5
    state, graphdef, rest, tx, schedule = state_lib.init_train_state(config, model, self.mesh)
    self.state_before = jax.device_get(state)
    step = train.make_train_step(graphdef, rest, tx, schedule, config)
    grad_fn = train.make_grad_fn(graphdef, rest, config)

    def step_and_grads(state, batch):
      # One program (XLA merges the two identical forward/backward passes): the step,
      # and the gradients of the very function it differentiates, at the key it uses.
      rng = jax.random.fold_in(state.rng, state.step)
      return step(state, batch), grad_fn(state.params, state.batch_stats, batch, rng)

    self.rng = jax.random.fold_in(state.rng, state.step)
    fn = jax.jit(step_and_grads, compiler_options=sharding_lib.compiler_options(config))
    (after, metrics), ((loss, (aux, _)), grads) = jax.device_get(fn(state, self.batch))
    self.state_after, self.metrics = after, metrics
    self._grads = {(False, "full"): ((loss, aux), torch_named(grads))}

  def grads(self, remat: bool = False, policy: str = "full"):
    """((loss, metrics), {torch key: grad}) of make_grad_fn on the initial state at the step's key."""
    key = (remat, policy)
    if key not in self._grads:
      config = train_config(self.meta, remat=remat, policy=policy)
      graphdef, _, _, rest = state_lib.split_model(_model(self.sd, config))
      fn = jax.jit(train.make_grad_fn(graphdef, rest, config),
                   compiler_options=sharding_lib.compiler_options(config))
      (loss, (aux, _)), g = fn(self.state_before.params, self.state_before.batch_stats,
                               self.batch, self.rng)
      self._grads[key] = jax.device_get((loss, aux)), torch_named(g)
    return self._grads[key]


_VECTORS: dict[pathlib.Path, Vector] = {}


@pytest.fixture(scope="module", params=FILES, ids=[p.stem for p in FILES])
def vector(request) -> Vector:
  if request.param not in _VECTORS:
    _VECTORS[request.param] = Vector(request.param)
  return _VECTORS[request.param]


def test_train_golden_vectors_exist():
  assert FILES, f"no golden train vectors in {TRAIN_GOLDEN_DIR}; set SEMASK_TRAIN_GOLDEN_DIR"


def test_recipe_weights(vector):
  abs_sum = sum(float(np.abs(a).astype(np.float64).sum()) for a in vector.sd.values())
  np.testing.assert_allclose(abs_sum, float(vector.vec["weights_abs_sum"]), rtol=1e-9,
                             err_msg="the recipe's random stream changed, not the model")


def test_step_losses(vector):
  m = vector.metrics
  assert m["finite"] == 1.0
  got = {"loss_ce": m["loss_ce"], "loss_cate": m["loss_cate"], "loss_total": m["loss"]}
  errs = {}
  for k, v in got.items():
    ref = float(vector.vec[k])
    errs[k] = abs(float(v) - ref) / abs(ref)
    assert errs[k] <= RTOL_LOSS, f"{k}: {float(v)!r} vs {ref!r} (relative {errs[k]:.2e})"
  assert float(m["lr"]) == pytest.approx(vector.lr, rel=1e-7)
  print(json.dumps({"loss_rel_err": {k: f"{v:.2e}" for k, v in errs.items()}}))


def _check_grads(vector, grads, label):
  assert set(grads) == set(vector.ref_grads), (
      sorted(set(grads) ^ set(vector.ref_grads))[:10])
  worst = (0.0, "", 0.0, 0.0)  # (err / bound, key, err, bound)
  worst_rel = (0.0, "")  # err / max |ref| over tensors whose gradient is not ~0
  failures = []
  for key, ref in vector.ref_grads.items():
    got = grads[key]
    assert got.shape == ref.shape, (key, got.shape, ref.shape)
    err = float(np.abs(got - ref).max())
    ref_max = float(np.abs(ref).max())
    bound = RTOL_GRAD * ref_max + RTOL_GRAD_MODEL * vector.grad_model_max
    if err > bound:
      failures.append(f"{key}: max |err| {err:.3e} > {bound:.3e}")
    worst = max(worst, (err / bound, key, err, bound))
    if ref_max > 1e-3 * vector.grad_model_max:
      worst_rel = max(worst_rel, (err / ref_max, key))
  print(json.dumps({f"grad_{label}": {"worst": worst[1], "err": f"{worst[2]:.3e}",
                                      "bound": f"{worst[3]:.3e}", "ratio": f"{worst[0]:.3f}",
                                      "worst_rel_of_nonzero": [worst_rel[1], f"{worst_rel[0]:.2e}"]}}))
  assert not failures, "\n".join(failures)


def test_step_gradients(vector):
  (loss, aux), grads = vector.grads()
  # make_grad_fn is the step's own: same loss, and the gradient norm the step logged.
  np.testing.assert_allclose(loss, vector.metrics["loss"], rtol=1e-6)
  norm = np.sqrt(sum(float(np.square(g.astype(np.float64)).sum()) for g in grads.values()))
  np.testing.assert_allclose(norm, vector.metrics["grad_norm"], rtol=1e-5)
  _check_grads(vector, grads, "no_remat")


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_gradients(vector, policy):
  (loss, aux), grads = vector.grads(remat=True, policy=policy)
  for k in ("loss_ce", "loss_cate"):
    ref = float(vector.vec[k])
    assert abs(float(aux[k]) - ref) <= RTOL_LOSS * abs(ref), (k, float(aux[k]), ref)
  _check_grads(vector, grads, f"remat_{policy}")


def test_step_batch_norm_statistics(vector):
  got = torch_named(vector.state_after.batch_stats)
  ref = {k[len("bn_after/"):]: v for k, v in vector.vec.items() if k.startswith("bn_after/")}
  assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:10]
  worst = 0.0
  for key, r in ref.items():
    err = float(np.abs(got[key] - r).max()) / float(np.abs(r).max())
    assert err <= RTOL_BN, f"{key}: relative error {err:.3e}"
    worst = max(worst, err)
  print(json.dumps({"bn_rel_err": f"{worst:.2e}"}))


def test_step_param_after(vector):
  got = torch_named(vector.state_after.params)
  before = torch_named(vector.state_before.params)
  ref = {k[len("param_after/"):]: v for k, v in vector.vec.items()
         if k.startswith("param_after/")}
  assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:10]
  worst_def = worst_noise = 0.0
  failures = []
  for key, r in ref.items():
    np.testing.assert_array_equal(before[key], vector.sd[key], err_msg=key)
    err = np.abs(got[key] - r) / vector.lr
    defined = np.abs(vector.ref_grads[key]) > GRAD_DEFINED
    e_def = float(err[defined].max(initial=0.0))
    e_noise = float(err[~defined].max(initial=0.0))
    if e_def > PARAM_TOL_LR or e_noise > PARAM_TOL_LR_NOISE:
      failures.append(f"{key}: |err|/lr {e_def:.3e} (|grad| > {GRAD_DEFINED}), "
                      f"{e_noise:.3e} elsewhere")
    worst_def, worst_noise = max(worst_def, e_def), max(worst_noise, e_noise)
  # The step moved the parameters (by about lr each where the gradient is defined).
  moved = max(float(np.abs(got[k] - before[k]).max()) for k in ref) / vector.lr
  assert moved > 0.5, moved
  print(json.dumps({"param_after_err_over_lr": {"grad_defined": f"{worst_def:.2e}",
                                                "elsewhere": f"{worst_noise:.2e}"}}))
  assert not failures, "\n".join(failures)
