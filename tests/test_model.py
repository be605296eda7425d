"""Model structure and behaviour beyond the golden vectors: sizes, variants, ablations,
dtypes, sharding, remat, training-mode layers and the loss reductions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from convert_weights import convert_semask
from semask_jax.losses.segmentation import ohem_weights, segmentation_loss
from semask_jax.models import (build_model, default_model_config, model_config_from_dict,
                               resolve_sem_global)
from semask_jax.models.layers import BatchNorm, Conv2d, KeyChain, gelu
from tests.golden_utils import golden_files, jit_forward, load_vector


def tiny_config(num_classes=5, **overrides):
  cfg = default_model_config("T", num_classes)
  cfg.embed_dim, cfg.depths, cfg.num_heads = 16, (2, 2, 2, 2), (1, 2, 4, 8)
  cfg.window_size = cfg.sem_window_size = 4
  cfg.fpn_channels = 16
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def n_params(model):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant,classes,expected", [
    ("T", 150, 34_655_748), ("T", 19, 34_243_753), ("T", 171, 34_721_793),
    ("S", 150, 55_973_652), ("B", 150, 96_485_826), ("L", 150, 210_791_934)])
def test_parameter_counts_equal_the_reference(variant, classes, expected):
  cfg = default_model_config(variant, classes)
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  assert n_params(model) == expected


def test_reference_rule_for_global_semantic_attention():
  assert resolve_sem_global(default_model_config("T", 150)) == (False, False, True, True)
  assert resolve_sem_global(default_model_config("L", 171)) == (False, False, True, True)
  assert resolve_sem_global(default_model_config("B", 150)) == (False,) * 4
  assert resolve_sem_global(default_model_config("T", 19)) == (False,) * 4
  cfg = default_model_config("T", 19)
  cfg.sem_global = (True, True, True, True)
  assert resolve_sem_global(cfg) == (True,) * 4


@pytest.mark.parametrize("shape", [(3, 37, 53), (2, 9, 130)])
def test_any_input_size_and_batch(shape):
  b, h, w = shape
  model = build_model(tiny_config(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (b, h, w, 3))
  out = jit_forward(model)(nnx.state(model), x)
  sizes = [(-(-h // 4), -(-w // 4))]
  for _ in range(3):
    sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
  for i in range(4):
    assert out["feats"][i].shape == (b, *sizes[i], 16 * 2 ** i)
    assert out["sems"][i].shape == (b, *sizes[i], 5)
  assert out["seg_logits"].shape == out["cls_logits"].shape == (b, *sizes[0], 5)
  assert np.isfinite(np.asarray(out["seg_logits"])).all()


def test_swin_fpn_baseline_and_ablations():
  base = build_model(tiny_config(num_sem_blocks=(0, 0, 0, 0)), rngs=nnx.Rngs(0))
  names = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(base, nnx.Param))]
  assert not any("semantic_layer" in n for n in names)
  out = base(jnp.zeros((1, 32, 32, 3)))
  assert "cls_logits" not in out
  _, aux = segmentation_loss(out, jnp.zeros((1, 32, 32), jnp.int32), ignore_index=255)
  assert set(aux) == {"loss_ce"}

  no_gamma = build_model(tiny_config(use_gamma=False), rngs=nnx.Rngs(0))
  assert not any(p[-1] == "gamma" for p, _ in nnx.to_flat_state(nnx.state(no_gamma, nnx.Param)))
  plain = build_model(tiny_config(sem_attention="plain"), rngs=nnx.Rngs(0))
  inj = plain.backbone.layers[0].semantic_layer.class_injection[0]
  assert inj.mlp_q.kernel.shape == (16, 16) and not hasattr(inj, "mlp_cls_k")
  two = build_model(tiny_config(num_sem_blocks=(1, 2, 2, 2)), rngs=nnx.Rngs(0))
  assert len(two.backbone.layers[3].semantic_layer.class_injection) == 2
  for m in (no_gamma, plain, two):
    assert np.isfinite(np.asarray(m(jnp.ones((1, 30, 30, 3)))["cls_logits"])).all()


def test_fresh_semantic_layer_is_its_layer_norm():
  """gamma is initialised to 0, so a new semantic layer returns LN(x) (SPEC 2)."""
  model = build_model(tiny_config(), rngs=nnx.Rngs(0))
  layer = model.backbone.layers[1].semantic_layer
  x = jax.random.normal(jax.random.key(0), (2, 6, 7, 32))
  y, sem = layer(x, KeyChain(None))
  np.testing.assert_allclose(y, layer.norm1(x), atol=1e-6)
  assert sem.shape == (2, 6, 7, 5)


def test_bad_config_is_refused_with_the_key():
  cfg = tiny_config()
  with pytest.raises(ValueError, match="unknown keys \\['emb_dim' \\(did you mean 'embed_dim'\\?\\)\\]"):
    build_model({**cfg.to_dict(), "emb_dim": 3}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads"):
    build_model(tiny_config(num_heads=(1, 2, 4)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="sem_attention"):
    build_model(tiny_config(sem_attention="cross"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="block_loop 'scanned' not in"):
    build_model(tiny_config(block_loop="scanned"), rngs=nnx.Rngs(0))


def test_block_loop_auto_scans_on_cpu_only():
  from semask_jax.models.config import resolve_block_loop
  assert resolve_block_loop("auto", "cpu") and not resolve_block_loop("auto", "gpu")
  assert not resolve_block_loop("auto", "tpu")
  assert resolve_block_loop("scan", "gpu") and not resolve_block_loop("unroll", "cpu")
  model = build_model(tiny_config(block_loop="unroll"), rngs=nnx.Rngs(0))
  assert not any(stage.scan_blocks for stage in model.backbone.layers)


@pytest.fixture(scope="module")
def golden_model():
  path = [p for p in golden_files() if "city" in p.stem] or golden_files()
  vec, meta, sd = load_vector(path[0])
  return vec, meta, sd


BF16_REL_ERR = 3e-2  # bf16 has an 8-bit mantissa (~4e-3 per op); errors add up over ~20 layers.


def test_bfloat16_forward_is_close_to_float32(golden_model):
  vec, meta, sd = golden_model
  images = jnp.asarray(vec["image"].transpose(0, 2, 3, 1))
  outs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = model_config_from_dict(meta["config"])
    cfg.dtype = dtype
    model = convert_semask(sd, cfg).model
    outs[dtype] = jit_forward(model)(nnx.state(model), images)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  for k in ("seg_logits", "cls_logits"):
    ref, got = np.asarray(outs["float32"][k]), np.asarray(outs["bfloat16"][k])
    assert got.dtype == np.float32
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= BF16_REL_ERR, (k, rel)
    assert rel > 0  # bf16 really ran


def test_sharded_forward_over_8_devices_equals_single_device(golden_model):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  vec, meta, sd = golden_model
  model = convert_semask(sd, model_config_from_dict(meta["config"])).model
  images = jnp.asarray(np.tile(vec["image"].transpose(0, 2, 3, 1), (8, 1, 1, 1)))
  images = images + jnp.arange(8.0)[:, None, None, None] * 0.1  # 8 different images
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  state = nnx.state(model)
  fwd = jit_forward(model)
  single = fwd(state, images)
  sharded_images = jax.device_put(images, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(state, NamedSharding(mesh, P()))
  multi = fwd(replicated, sharded_images)
  assert len(multi["seg_logits"].sharding.device_set) == 8
  for k in ("seg_logits", "cls_logits"):
    np.testing.assert_allclose(np.asarray(multi[k]), np.asarray(single[k]), rtol=1e-5, atol=1e-5)


def _train_step_fn(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, rest, images, labels, rng):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest, copy=True)
      out = m(images, train=True, rng=rng)
      loss, _ = segmentation_loss(out, labels, ignore_index=255)
      return loss, nnx.state(m, nnx.BatchStat)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, stats
  return step, params, rest


@pytest.mark.parametrize("remat", [False, True])
def test_batchnorm_statistics_of_the_global_batch_under_sharding(remat):
  """SyncBN: with the batch sharded over 8 devices the statistics are the global batch's
  (and the sequenced remat, which reads its cotangent per example, shards the same way)."""
  model = build_model(tiny_config(depths=(1, 1, 1, 1), drop_path_rate=0.0, sem_dropout=0.0,
                                  head_dropout=0.0, remat=remat), rngs=nnx.Rngs(0))
  step, params, rest = _train_step_fn(model)
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  labels = jax.random.randint(jax.random.key(1), (8, 32, 32), 0, 5)
  ref = step(params, rest, images, labels, jax.random.key(2))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  rep = lambda t: jax.device_put(t, NamedSharding(mesh, P()))
  got = step(rep(params), rep(rest), shard(images), shard(labels), jax.random.key(2))
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(ref[1:])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_mlp_backward_keeps_only_the_hidden_pre_activation(capsys):
  """GELU + fc2 are rematerialised: of the hidden width (4C) the backward pass keeps one
  map (fc1's output), not also the GELU output and its derivative's intermediates."""
  from jax.ad_checkpoint import print_saved_residuals
  from semask_jax.models.swin import Mlp
  mlp = Mlp(8, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  g, s = nnx.split(mlp)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8), jnp.bfloat16)
  f = lambda s, x: (nnx.merge(g, s)(x).astype(jnp.float32) ** 2).sum()  # noqa: E731
  capsys.readouterr()
  print_saved_residuals(f, s, x)
  hidden = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bf16[2,5,32]")]
  assert len(hidden) == 1, hidden
  # Same values and gradients as the plain composition (float32).
  g, s = nnx.split(Mlp(8, 32, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  x = x.astype(jnp.float32)

  def plain(s, x):
    m = nnx.merge(g, s)
    return (m.fc2(gelu(m.fc1(x))) ** 2).sum()
  np.testing.assert_allclose(f(s, x), plain(s, x), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.grad(f)(s, x)), jax.tree.leaves(jax.grad(plain)(s, x))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_remat_model_jits_as_a_bound_method():
  """jax.jit(model.segment), the model a constant of the jit (as tests and users do), with
  a jax.checkpoint-policy remat (nnx.remat of a captured module; `full` is a custom VJP)."""
  model = build_model(tiny_config(remat=True, remat_policy="dots"), rngs=nnx.Rngs(0))
  plain = build_model(tiny_config(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  np.testing.assert_allclose(jax.jit(model.segment)(x), jax.jit(plain.segment)(x),
                             rtol=1e-6, atol=1e-6)


def test_remat_gives_the_same_loss_and_gradients():
  # 'full' is swin.sequenced_remat (custom VJP); 'dots' stands for the jax.checkpoint
  # policies (each of which test_golden_train checks against the reference's gradients).
  res = []
  for remat, policy in ((False, "full"), (True, "full"), (True, "dots")):
    model = build_model(tiny_config(depths=(2, 1, 1, 1), remat=remat, remat_policy=policy),
                        rngs=nnx.Rngs(0))
    step, params, rest = _train_step_fn(model)
    images = jax.random.normal(jax.random.key(0), (2, 40, 36, 3))
    labels = jax.random.randint(jax.random.key(1), (2, 40, 36), 0, 5)
    res.append(step(params, rest, images, labels, jax.random.key(3)))
  for other in res[1:]:
    for a, b in zip(jax.tree.leaves(res[0]), jax.tree.leaves(other)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fused_window_attention_is_the_same_function():
  """attention_impl='fused' (jax.nn.dot_product_attention, cuDNN on GPUs) against the
  einsum path: loss and gradients of a training step, shifted windows and window
  padding included (40x36 -> stage 0 10x9 tokens, windows of 4)."""
  res = []
  for impl in ("einsum", "fused"):
    model = build_model(tiny_config(depths=(2, 2, 1, 1), attention_impl=impl), rngs=nnx.Rngs(0))
    step, params, rest = _train_step_fn(model)
    images = jax.random.normal(jax.random.key(0), (2, 40, 36, 3))
    labels = jax.random.randint(jax.random.key(1), (2, 40, 36), 0, 5)
    res.append(step(params, rest, images, labels, jax.random.key(3)))
  for a, b in zip(jax.tree.leaves(res[0]), jax.tree.leaves(res[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="attention_impl 'flash' not in"):
    build_model(tiny_config(attention_impl="flash"), rngs=nnx.Rngs(0))


def _window_attention_and_grads(impl, dtype, qkv, mask, window=12):
  """WindowAttention.attend's output and its gradients (qkv, relative-bias table) under a
  fixed random cotangent; the layer's parameters from nnx.Rngs(0)."""
  from semask_jax.models.swin import WindowAttention
  attn = WindowAttention(64, 2, window, dtype=dtype, rngs=nnx.Rngs(0), impl=impl)
  g = jax.random.normal(jax.random.key(2), qkv.shape[:-1] + (64,))

  graphdef, params = nnx.split(attn)

  def f(params, qkv):
    out = nnx.merge(graphdef, params).attend(qkv.astype(dtype), mask)
    return jnp.sum(out.astype(jnp.float32) * g), out
  (_, out), (d_params, d_qkv) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, qkv)
  d_table = d_params["relative_position_bias_table"][...]
  return [np.asarray(x, np.float32) for x in (out, d_qkv, d_table)]


def test_odd_windows_get_a_hidden_token_and_the_same_function():
  """What attention_impl='cudnn' does to a 7x7 window (cuDNN trains with a bias only on
  even token counts): one zero token whose key the bias hides, whose row is dropped. Here
  through XLA's implementation, in float32: output and gradients as without it."""
  from semask_jax.models.swin import WindowAttention
  from semask_jax.models.windows import shift_mask
  attn = WindowAttention(32, 2, 7, dtype=jnp.float32, rngs=nnx.Rngs(0), impl="fused")
  graphdef, params = nnx.split(attn)
  qkv = jax.random.normal(jax.random.key(1), (2, 4, 49, 3, 2, 16))
  g = jax.random.normal(jax.random.key(2), (2, 4, 49, 2, 16))
  for mask in (None, shift_mask(14, 14, 7, 3)):
    res = []
    for even in (False, True):
      def f(params, qkv):
        out = nnx.merge(graphdef, params)._fused(qkv[..., 0, :, :], qkv[..., 1, :, :],
                                                  qkv[..., 2, :, :], mask, even_tokens=even)
        return jnp.sum(out * g), out
      (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, qkv)
      res.append([out, *jax.tree.leaves(grads)])
    for a, b in zip(*res):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_cudnn_window_attention_is_refused_off_gpu():
  """attention_impl='cudnn' where JAX has no cuDNN (this CPU): a ValueError that names
  the way out, not JAX's internal one."""
  if jax.default_backend() == "gpu":
    pytest.skip("cuDNN is there: test_cudnn_window_attention_matches_einsum_on_gpu")
  qkv = jnp.zeros((1, 4, 144, 192), jnp.bfloat16)
  with pytest.raises(ValueError, match="attention_impl='einsum'"):
    _window_attention_and_grads("cudnn", jnp.bfloat16, qkv, None)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention: GPU only")
@pytest.mark.parametrize("window", [12, 7])
def test_cudnn_window_attention_matches_einsum_on_gpu(window):
  """cuDNN's flash attention (windows as heads, bias [1, nW * h, N, N]; window 7's hidden
  50th token) against the float32 einsum path: output and gradients (inputs and
  relative-bias table) of a plain and a shifted window attention (4 windows), to bfloat16
  accuracy."""
  from semask_jax.models.windows import shift_mask
  qkv = jax.random.normal(jax.random.key(1), (2, 4, window * window, 192))
  for mask in (None, shift_mask(2 * window, 2 * window, window, window // 2)):
    with jax.default_matmul_precision("highest"):
      ref = _window_attention_and_grads("einsum", jnp.float32, qkv, mask, window)
    got = _window_attention_and_grads("cudnn", jnp.bfloat16, qkv, mask, window)
    for name, a, b in zip(("output", "d qkv", "d bias table"), got, ref):
      scale = np.abs(b).max()
      assert np.abs(a - b).max() <= 2e-2 * scale, (name, np.abs(a - b).max(), scale)


def test_train_mode_randomness_is_keyed():
  model = build_model(tiny_config(depths=(1, 1, 1, 1)), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda rng: nnx.merge(graphdef, state, copy=True)(x, train=True, rng=rng)["seg_logits"])
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4


def test_batchnorm_matches_torch_update_rule():
  import torch
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 6, 3)).astype(np.float32)
  bn = BatchNorm(3)
  y = bn(jnp.asarray(x), train=True)
  tbn = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=0.1)
  ty = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(y), ty, atol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.mean[...]), tbn.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.var[...]), tbn.running_var.numpy(), rtol=1e-5)
  # Gradients as torch's (the backward recomputes the statistics from the kept input).
  g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  gs = nnx.grad(lambda m, x: (m(x, train=True) * g).sum(), argnums=(0, 1))(
      BatchNorm(3), jnp.asarray(x))
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
  tbn = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=0.1)
  (tbn(tx) * torch.from_numpy(g.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_allclose(np.asarray(gs[1]), tx.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gs[0].scale[...]), tbn.weight.grad.numpy(), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(gs[0].bias[...]), tbn.bias.grad.numpy(), rtol=1e-4)


def test_conv2d_is_torchs_conv_and_a_1x1_one_is_a_matmul():
  """Conv2d against torch.nn.Conv2d (3x3 padded, 4x4 strided, 1x1), values and gradients;
  the 1x1 one is computed as a matmul over the channels (no convolution in its program)."""
  import torch
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 5)).astype(np.float32)
  g = np.random.default_rng(1).normal(size=(2, 8, 12, 7)).astype(np.float32)
  for k, stride, pad in ((3, 1, 1), (4, 4, 0), (1, 1, 0)):
    conv = Conv2d(5, 7, k, stride=stride, padding=pad, rngs=nnx.Rngs(0))
    tconv = torch.nn.Conv2d(5, 7, k, stride=stride, padding=pad)
    with torch.no_grad():
      tconv.weight.copy_(torch.tensor(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1)))
      tconv.bias.copy_(torch.tensor(np.asarray(conv.bias[...])))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    ty = tconv(tx)
    gy = g[:, :ty.shape[2], :ty.shape[3]]
    (ty * torch.from_numpy(gy.transpose(0, 3, 1, 2))).sum().backward()
    y, (gk, gx) = nnx.value_and_grad(lambda c, x: (c(x) * gy).sum(), argnums=(0, 1))(
        conv, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))),
                               ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gk.kernel[...]),
                               tconv.weight.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-5)
    hlo = jax.jit(lambda x: conv(x)).lower(jnp.asarray(x)).as_text()
    assert ("convolution" in hlo) == (k != 1), (k, stride)


def test_batchnorm_backward_keeps_its_input_alone(capsys):
  """Training BatchNorm is rematerialised: no float32 map of the input's size is kept."""
  from jax.ad_checkpoint import print_saved_residuals
  g, s = nnx.split(BatchNorm(3))
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3), jnp.bfloat16)
  capsys.readouterr()
  print_saved_residuals(lambda s, x: nnx.merge(g, s)(x, train=True).astype(jnp.float32).sum(),
                        s, x)
  out = capsys.readouterr().out.splitlines()
  assert not [ln for ln in out if ln.startswith("f32[2,5,6,3]")], out
  assert [ln for ln in out if ln.startswith("bf16[2,5,6,3]")], out


def test_loss_reductions_and_ohem():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  labels = np.array(jax.random.randint(jax.random.key(1), (2, 8, 8), 0, 3))
  labels[0, :4] = 255
  out = {"seg_logits": logits}
  ref, _ = segmentation_loss(out, jnp.asarray(labels), ignore_index=255, reduction="reference")
  valid, _ = segmentation_loss(out, jnp.asarray(labels), ignore_index=255, reduction="valid")
  n_valid = (labels != 255).sum()
  np.testing.assert_allclose(float(valid), float(ref) * labels.size / n_valid, rtol=1e-6)
  # OHEM keeps exactly B * min_kept of the hardest valid pixels.
  ce = jnp.asarray(np.random.default_rng(0).random((2, 8, 8)), jnp.float32)
  w = np.asarray(ohem_weights(ce, jnp.asarray(labels != 255), min_kept=10))
  assert w.sum() == 20 and (w[labels == 255] == 0).all()
  assert np.asarray(ce)[w == 1].min() >= np.asarray(ce)[(w == 0) & (labels != 255)].max()
  all_kept = np.asarray(ohem_weights(ce, jnp.asarray(labels != 255), min_kept=1000))
  np.testing.assert_array_equal(all_kept, labels != 255)


def test_gelu_is_torchs_exact_gelu():
  """layers.gelu against torch.nn.functional.gelu (erf form): float32 values and
  gradients, and bfloat16, where both compute in float32 and round once."""
  import torch
  x = np.concatenate([np.linspace(-12, 12, 4001, dtype=np.float32),
                      np.random.default_rng(0).standard_normal(4000).astype(np.float32)])
  xt = torch.from_numpy(x).requires_grad_(True)
  ref = torch.nn.functional.gelu(xt)
  ref.sum().backward()
  got, grad = jax.value_and_grad(lambda v: gelu(v).sum())(jnp.asarray(x))
  # Both round 1 + erf(x / sqrt(2)) to float32, which cancels for x << 0: up to an ulp
  # of 1 (2^-23) times |x| <= 12 apart there, whatever erf each library uses.
  tail = 12 * 2.0 ** -23
  np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), ref.detach().numpy(),
                             rtol=2e-6, atol=tail)
  np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=2e-6, atol=tail)
  np.testing.assert_allclose(float(got), float(ref.detach().sum()), rtol=1e-6)
  xb = torch.from_numpy(x).to(torch.bfloat16)
  ref_b = torch.nn.functional.gelu(xb).float().numpy()
  got_b = np.asarray(gelu(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
  # One rounding of float32 values that are `tail` apart at most: equal, or one
  # bfloat16 step (2^-8 relative, at most 2^-7 of the rounded value) apart.
  step = np.abs(ref_b) * 2.0 ** -7 + tail
  assert np.all(np.abs(got_b - ref_b) <= step), np.abs(got_b - ref_b).max()


@pytest.mark.parametrize("small,big", [((13, 9), (52, 36)), ((7, 5), (25, 19))])
def test_pixel_cross_entropy_matches_torch(small, big):
  """Both loss paths (row-blocked x2^k up-sampling, generic resize) against torch."""
  import torch
  import torch.nn.functional as F
  from semask_jax.losses.segmentation import pixel_cross_entropy
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, *small, 6)).astype(np.float32) * 3
  labels = rng.integers(0, 6, size=(2, *big)).astype(np.int32)
  labels[:, :5] = 255
  ce, valid = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), ignore_index=255)
  up = F.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=big, mode="bilinear",
                     align_corners=False)
  ref = F.cross_entropy(up, torch.from_numpy(labels).long(), reduction="none", ignore_index=255)
  np.testing.assert_allclose(np.asarray(ce), ref.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(valid), labels != 255)


def test_drop_path_keeps_a_sample_where_its_draw_is_below_the_keep_probability():
  from semask_jax.models import swin  # pylint: disable=import-outside-toplevel
  x = jnp.arange(4 * 2 * 2 * 3, dtype=jnp.bfloat16).reshape(4, 2, 2, 3) + 1
  u = jnp.asarray([0.1, 0.8, 0.74, 0.75], jnp.float32)  # [B]
  want = np.asarray(x, np.float32) / np.float32(0.75)
  want[[1, 3]] = 0  # u >= keep: dropped
  for keep in (0.75, jnp.float32(0.75)):  # the attribute, or the scan's traced scalar
    y = swin.drop_path(x, keep, u)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2)
  assert swin.drop_path(x, 1.0, u) is x  # rate 0
  assert swin.drop_path(x, 0.75, None) is x  # deterministic
  np.testing.assert_array_equal(swin.drop_path(x, jnp.float32(1.0), u), x)  # u < 1 always
