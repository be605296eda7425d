"""The FaPN / MSFaPN path with settings the golden vectors do not have (19 classes, 4
deformable groups, window 3, mask_dim != hidden_dim, an input whose stride-32 map is 3x2,
so the legacy-nearest steps are 3x2 -> 5x3 -> 10x6): a model exported to a released-style
state dict (the shared GroupNorm stored twice) converts back with its config read from
the shapes, to the same parameters and the same outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert_weights import convert_semask_mask2former, names
from semask_jax.models import build_model, model_config_from_dict
from semask_jax.models.resize import nearest_index, resize_nearest


def _config(decoder):
  return model_config_from_dict(dict(
      pixel_decoder=decoder, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
      # 19 classes: the semantic window is detectron2's default 7 (released_sem_window).
      window_size=3, sem_window_size=7, num_sem_blocks=1, num_classes=19, nheads=2,
      enc_layers=1, enc_dim_feedforward=32, conv_dim=32, mask_dim=24, hidden_dim=16,
      num_queries=5, dim_feedforward=32, dec_layers=2, deformable_groups=4))


def _export(model):
  """The model's parameters as a torch state dict, with align_N.offset.norm.* = layer_N.norm.*
  as the reference stores its shared GroupNorm."""
  sd = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    sd[names.torch_key(path)] = names.to_torch_layout(path, np.asarray(var[...]))
  for k in list(sd):
    if ".layer_" in k and ".norm." in k:
      n = k.split(".layer_")[1].split(".")[0]
      alias = k.replace(f".layer_{n}.norm.", f".align_{n}.offset.norm.")
      if alias.replace(".norm.weight", ".weight").replace(".norm.bias", ".weight") in sd:
        sd[alias] = sd[k].copy()
  return sd


@pytest.mark.parametrize("decoder", ["fapn", "msfapn"])
def test_fapn_round_trip_other_settings(decoder):
  cfg = _config(decoder)
  model = build_model(cfg, rngs=nnx.Rngs(3))
  # Non-zero offsets and masks (the init's are zero), so that the DCN samples off-grid.
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if "conv_offset_mask" in names.model_name(path):
      var[...] = 0.3 * jax.random.normal(jax.random.key(len(path)), var[...].shape)
  sd = _export(model)
  n_aligned = 3 if decoder == "fapn" else 1
  assert sum(".offset.norm." in k for k in sd) == 2 * n_aligned
  conv = convert_semask_mask2former(sd, nheads=cfg.nheads if decoder == "fapn" else None)
  unused = ("enc_layers", "enc_dim_feedforward") if decoder == "fapn" else ()  # no encoder
  for k in cfg.keys():
    if k not in unused:
      assert conv.config[k] == cfg[k], (k, conv.config[k], cfg[k])
  assert conv.config.deformable_groups == 4
  got = dict(nnx.to_flat_state(nnx.state(conv.model, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(var[...]))
  images = jax.random.normal(jax.random.key(0), (1, 80, 48, 3))
  fwd = lambda m: jax.jit(lambda s, x: nnx.merge(nnx.graphdef(m), s)(x)["sem_seg"])(
      nnx.state(m), images)
  a, b = fwd(model), fwd(conv.model)
  assert a.shape == (1, 80, 48, 19) and bool(jnp.isfinite(a).all())
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_legacy_nearest():
  """torch's F.interpolate(mode='nearest'): floor(dst * in / out), no half-pixel offset."""
  assert list(nearest_index(2, 3)) == [0, 0, 1]
  assert list(nearest_index(4, 7)) == [0, 0, 1, 1, 2, 2, 3]
  assert list(nearest_index(3, 5)) == [0, 0, 1, 1, 2]
  assert list(nearest_index(3, 6)) == [0, 0, 1, 1, 2, 2]
  x = jnp.arange(2 * 3, dtype=jnp.float32).reshape(1, 2, 3, 1)
  y = resize_nearest(x, (3, 7))
  np.testing.assert_array_equal(np.asarray(y[0, :, :, 0]), np.asarray(
      x[0][np.array([0, 0, 1])][:, np.array([0, 0, 0, 1, 1, 2, 2]), 0]))
  torch = pytest.importorskip("torch")
  for (h, w), (oh, ow) in (((2, 3), (3, 7)), ((3, 2), (5, 3)), ((5, 3), (10, 6))):
    x = np.random.default_rng(0).normal(size=(1, 2, h, w)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.tensor(x), size=(oh, ow), mode="nearest")
    got = resize_nearest(jnp.asarray(x.transpose(0, 2, 3, 1)), (oh, ow))
    np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), want.numpy())


@pytest.mark.parametrize("decoder", ["fapn", "msfapn"])
def test_fapn_init_as_detectron2(decoder):
  """SPEC 13 / 12: adapters, layers, align offset convs and (FaPN) mask_features
  c2_xavier_fill (U(+-sqrt(3 / fan_in)), bias 0); the DCN kernel U(+-1/sqrt(9 C)), bias 0;
  conv_offset_mask zero; the GroupNorms 1 / 0; one GroupNorm per level (layer_N.norm)."""
  cfg = _config(decoder)
  model = build_model(cfg, rngs=nnx.Rngs(0))
  pd = model.sem_seg_head.pixel_decoder
  params = {names.model_name(p): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(pd, nnx.Param))}
  levels = (1, 2, 3) if decoder == "fapn" else (1,)
  assert not any(".offset.norm." in k or k.startswith(f"align_{n}.offset.scale")
                 for k in params for n in levels)
  for n in levels:
    for name in (f"adapter_{n}.kernel", f"layer_{n}.kernel", f"align_{n}.offset.kernel"):
      w = params[name]
      bound = np.sqrt(3.0 / np.prod(w.shape[:3]))
      assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound, name
    w = params[f"align_{n}.dcpack_L2.kernel"]
    bound = 1 / np.sqrt(9 * cfg.conv_dim)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    for name in (f"align_{n}.dcpack_L2.bias", f"align_{n}.dcpack_L2.conv_offset_mask.kernel",
                 f"align_{n}.dcpack_L2.conv_offset_mask.bias", f"layer_{n}.norm.bias"):
      assert not params[name].any(), name
    assert (params[f"layer_{n}.norm.scale"] == 1).all()
  if decoder == "fapn":
    w = params["mask_features.kernel"]
    assert w.shape == (3, 3, cfg.conv_dim, cfg.mask_dim)
    assert np.abs(w).max() <= np.sqrt(3.0 / (9 * cfg.conv_dim))
    assert not params["mask_features.bias"].any()
    assert "layer_4.kernel" in params and "adapter_4.kernel" not in params


@pytest.mark.parametrize("decoder", ["fapn", "msfapn"])
def test_swin_imagenet_into_a_fapn_model(decoder):
  """A Swin ImageNet checkpoint's keys fill the backbone of FaPN / MSFaPN-Mask2Former (the
  key list of the released Swin-L file; shapes only); the head keeps its init."""
  from convert_weights import plan_state_dict
  from convert_weights.__main__ import _parser
  from semask_jax.models import default_model_config
  from tests.test_convert import _fake_state_dict, _swin_keys
  entry = _swin_keys()["swin_large_patch4_window12_384_22k"]
  sd = _fake_state_dict(entry["keys"])
  cfg = default_model_config("L", 150, num_sem_blocks=1, name="semask_mask2former")
  cfg.pixel_decoder = decoder
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  r, _ = plan_state_dict(model, sd, backbone_only=True)
  assert any(k.startswith("sem_seg_head.pixel_decoder.align_1.dcpack_L2") for k in r.new)
  assert all(k.startswith("backbone.") is False for k in r.used)  # ImageNet names
  assert len(r.used) == len(sd) - len(r.skipped)
  args = _parser().parse_args(["swin_imagenet", "--pth", "x.pth", "--variant", "L",
                               "--num_classes", "150", "--head", f"{decoder}_mask2former",
                               "--out", "y"])
  assert args.head == f"{decoder}_mask2former"
  from convert_weights.__main__ import main as cli_main
  assert cli_main(["swin_imagenet", "--pth", "/nonexistent/x.pth", "--variant", "T",
                   "--num_classes", "150", "--head", f"{decoder}_mask2former",
                   "--out", "/nonexistent/y"]) == 2  # the config builds; the file is missing
