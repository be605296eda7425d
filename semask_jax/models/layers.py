"""Small building blocks shared by the backbone and the decoders.

Parameter leaf names follow Flax (`kernel`, `scale`, `bias`); module names
follow the reference PyTorch checkpoint so that conversion is a name map.
Norms, softmaxes and the loss run in float32 whatever the compute dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semask_jax.models import valid

# Set while a training step with a split train state (config.state_sharding='fsdp') is
# traced: the sharding that matmul and convolution weights are gathered to after their
# cast to the compute dtype (weight() below).
_WEIGHT_SHARDING: contextvars.ContextVar[Any] = contextvars.ContextVar("weight_sharding",
                                                                        default=None)


@contextlib.contextmanager
def gathered_weights(sharding: Any) -> Iterator[None]:
  """Within: weight() gathers each weight to `sharding` (replicated over the mesh).

  With the train state split over the devices, GSPMD otherwise chooses where each
  weight is gathered, and may instead carry a weight's split into the activations
  (window attention's, on the tiny model over 8 CPU devices: "involuntary full
  rematerialization" warnings). Gathering after the cast moves compute-dtype bytes."""
  token = _WEIGHT_SHARDING.set(sharding)
  try:
    yield
  finally:
    _WEIGHT_SHARDING.reset(token)


def weight(w: jax.Array, dtype) -> jax.Array:
  """A matmul / convolution weight as used: cast to the compute dtype, and gathered whole
  where gathered_weights is active."""
  w = w.astype(dtype)
  sharding = _WEIGHT_SHARDING.get()
  return w if sharding is None else jax.lax.with_sharding_constraint(w, sharding)

def _draw(rngs: nnx.Rngs, shape: tuple[int, ...], kind: str, scale: float) -> jax.Array:
  """Initial values drawn on the host from the next 'params' key of `rngs`.

  Building a model eagerly then costs no XLA compilation per parameter shape
  (tens of seconds on a CPU for the B/L variants) and stays a deterministic
  function of the seed. Under tracing (nnx.eval_shape, jit) the same
  distribution is drawn with jax.random instead.
  """
  key = rngs.params()
  if isinstance(key, jax.core.Tracer):
    if kind == "normal":
      return scale * jax.random.normal(key, shape, jnp.float32)
    return jax.random.uniform(key, shape, jnp.float32, -scale, scale)
  gen = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  values = gen.normal(0.0, scale, shape) if kind == "normal" else gen.uniform(-scale, scale, shape)
  return jnp.asarray(values, jnp.float32)


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
  return _draw(rngs, shape, "normal", std)


def uniform_init(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float) -> jax.Array:
  return _draw(rngs, shape, "uniform", bound)


def xavier_uniform_init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
                        fan_out: int) -> jax.Array:
  """torch.nn.init.xavier_uniform_ (Mask2Former's init of its transformer matrices)."""
  return uniform_init(rngs, shape, float(np.sqrt(6.0 / (fan_in + fan_out))))


def linear_init(rngs: nnx.Rngs, shape: tuple[int, ...]) -> jax.Array:
  """timm trunc_normal_(std=.02): its bounds (-2, 2) are absolute (100 std), so this is
  an untruncated N(0, 0.02^2) (mmseg's backbone init, the Swin position tables)."""
  return normal_init(rngs, shape, 0.02)


# ----------------------------------------------------------------------------
# Named initialisers (SPEC section 13), each as the reference function it reproduces.
# One signature, init(rngs, shape, fan_in, fan_out) -> float32 array, with torch's fans
# (a Linear [in, out]: fan_in = in; a conv: channels x kernel area; a bias: its weight's
# fans). Those that draw nothing (zeros) take no key from `rngs`.
# ----------------------------------------------------------------------------

Init = Callable[[nnx.Rngs, tuple[int, ...], int, int], jax.Array]


def zeros(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, fan_out: int) -> jax.Array:
  """nn.init.zeros_ / mmcv's bias 0."""
  del rngs, fan_in, fan_out
  return jnp.zeros(shape, jnp.float32)


def trunc_normal_002(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
                     fan_out: int) -> jax.Array:
  """timm trunc_normal_(std=.02) (= N(0, 0.02^2), see linear_init): every Linear of the
  SeMask-FPN backbone after mmseg's backbone.init_weights."""
  del fan_in, fan_out
  return linear_init(rngs, shape)


def pytorch_default_uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
                            fan_out: int) -> jax.Array:
  """An nn.Linear / nn.Conv2d left alone: weight kaiming_uniform(a=sqrt 5) and bias both
  U(+-1/sqrt(fan_in)) (fan_in of the weight)."""
  del fan_out
  return uniform_init(rngs, shape, 1.0 / float(np.sqrt(fan_in)))


def kaiming_normal_fan_in(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
                          fan_out: int) -> jax.Array:
  """nn.init.kaiming_normal_ with its defaults (mode fan_in, leaky_relu slope 0):
  N(0, 2 / fan_in) (SemanticAttention.init_weight)."""
  del fan_out
  return normal_init(rngs, shape, float(np.sqrt(2.0 / fan_in)))


def kaiming_normal_fan_out(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
                           fan_out: int) -> jax.Array:
  """mmcv kaiming_init defaults (normal, fan_out, relu): N(0, 2 / fan_out) (ConvModule)."""
  del fan_in
  return normal_init(rngs, shape, float(np.sqrt(2.0 / fan_out)))


def xavier_uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
                   fan_out: int) -> jax.Array:
  """nn.init.xavier_uniform_ (gain 1): U(+-sqrt(6 / (fan_in + fan_out)))."""
  return xavier_uniform_init(rngs, shape, fan_in, fan_out)


def c2_xavier_fill(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
                   fan_out: int) -> jax.Array:
  """fvcore c2_xavier_fill's weight: kaiming_uniform(a=1), U(+-sqrt(3 / fan_in)) (its bias
  is zeros)."""
  del fan_out
  return uniform_init(rngs, shape, float(np.sqrt(3.0 / fan_in)))


def normal(std: float) -> Init:
  """N(0, std^2) whatever the fans: mmcv normal_init (conv_seg, 0.01), nn.Embedding (1)."""
  def init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, fan_out: int) -> jax.Array:
    del fan_in, fan_out
    return normal_init(rngs, shape, std)
  init.__name__ = f"normal({std})"
  return init


def given(values: Any) -> Init:
  """These exact values (checked against the shape): a deterministic init such as
  MSDeformAttn's offset grid, or one draw shared by deep copies of a module."""
  def init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, fan_out: int) -> jax.Array:
    del rngs, fan_in, fan_out
    out = jnp.array(values, jnp.float32)
    if out.shape != tuple(shape):
      raise ValueError(f"given init: values of shape {out.shape}, parameter {tuple(shape)}")
    return out
  return init


@dataclasses.dataclass(frozen=True)
class LinearInit:
  """How a Linear's or a Conv2d's kernel and bias start (two Inits)."""
  kernel: Init
  bias: Init


# mmseg's backbone.init_weights (the SeMask-FPN backbone): trunc_normal(0.02), bias 0.
TRUNC_NORMAL = LinearInit(trunc_normal_002, zeros)
# An nn.Linear nobody re-initialises (the SeMask-Mask2Former backbone, the heads' MLPs).
TORCH_DEFAULT = LinearInit(pytorch_default_uniform, pytorch_default_uniform)
# SemanticAttention.init_weight's q / k / v (detectron2 path): kaiming_normal_, bias 0.
KAIMING_NORMAL = LinearInit(kaiming_normal_fan_in, zeros)
# Xavier kernels: with a zero bias (MSDeformAttn's projections, MultiheadAttention's
# out_proj) or with the default bias left by a sweep over the 2-D parameters only (FFNs).
XAVIER_ZERO_BIAS = LinearInit(xavier_uniform, zeros)
XAVIER_DEFAULT_BIAS = LinearInit(xavier_uniform, pytorch_default_uniform)
ZEROS = LinearInit(zeros, zeros)
# fvcore c2_xavier_fill (detectron2's Conv2d layers of the pixel decoder): bias 0.
C2_XAVIER = LinearInit(c2_xavier_fill, zeros)


_SQRT_HALF = np.float32(0.7071067811865476)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch.nn.GELU(); Flax's default is the tanh form.

  torch's formula x * 0.5 * (1 + erf(x / sqrt(2))), computed in float32 as torch's
  bfloat16 kernels do, written x * (0.5 + 0.5 * erf(.)) (the same value: halving is
  exact). jax.nn.gelu(approximate=False) is x * erfc(-x / sqrt(2)) / 2 in the input's
  dtype: in bfloat16 it scales by a bfloat16 sqrt(1/2) and XLA:GPU split it into two
  passes over the MLP's hidden map. This form is one pass: on an H200 (deviceless,
  docs/performance.md) SeMask-T inference moves 13 % fewer bytes and SeMask-B training 4 %; on
  the CPU the float32 training step is 2-5 % faster and has the fewest XLA temporaries
  of the forms tried. (Under XLA:CPU's default YNNPACK reduce fusions its two constants
  become full-size maps at inference, +31 MB for SeMask-T; the tuned evaluation list of
  config.xla_cpu_ynn_fusions has no such fusions.)
  """
  x32 = x.astype(jnp.float32)
  return (x32 * (0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


class Linear(nnx.Module):
  """y = x @ kernel + bias; kernel [in, out]. `init`: the reference's init of this Linear
  (default TRUNC_NORMAL, mmseg's backbone init)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               init: LinearInit = TRUNC_NORMAL, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    fans = (in_features, out_features)
    self.kernel = nnx.Param(init.kernel(rngs, (in_features, out_features), *fans))
    self.bias = nnx.Param(init.bias(rngs, (out_features,), *fans)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear(x, self.kernel[...], None if self.bias is None else self.bias[...],
                  self.dtype)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
  """Linear.__call__ on plain arrays (for jax transforms that take arrays, not modules)."""
  y = jnp.einsum("...i,io->...o", x.astype(dtype), weight(kernel, dtype))
  if bias is not None:
    y = add_bias(y, bias)
  return y


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over the last axis, added in y's (compute) dtype, with the bias gradient
  reduced in float32: reduced in bfloat16, a bias gradient that is a small residual of
  many terms of both signs lost most of its digits (cosine 0.96 to float32's for a
  qkv bias; tests/test_bf16.py). In float32 it is plain autodiff's."""
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y: jax.Array, bias: jax.Array):
  return add_bias(y, bias), jnp.zeros((0,), bias.dtype)  # residual: the bias dtype only


def _add_bias_bwd(res: jax.Array, g: jax.Array):
  dbias = jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))
  return g, dbias.astype(res.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm (eps 1e-5), computed in float32, output in `dtype`."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype: jnp.dtype = jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return _layer_norm(x, self.scale[...], self.bias[...], self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype) -> jax.Array:
  """Rematerialised: the backward keeps x alone, and recomputes the rest fused
  into its own loops, instead of keeping the normalised map and full-size
  broadcasts of scale and 1/std from the forward pass."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale + bias).astype(dtype)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over the last (channel) axis of NHWC maps, in float32.

  Statistics per example and group over (H, W, C/groups), biased variance,
  eps 1e-5; the output is cast back to `dtype`.
  """

  def __init__(self, num_groups: int, dim: int, *, eps: float = 1e-5,
               dtype: jnp.dtype = jnp.float32):
    if dim % num_groups:
      raise ValueError(f"GroupNorm: {dim} channels are not divisible into {num_groups} groups")
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.num_groups = num_groups
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
    """x: [B, ..., C] -> same shape. valid_hw: [B, 2] (x NHWC): statistics over each
    image's valid region only (models/valid.py)."""
    if valid_hw is not None:
      return valid.group_norm(x, valid_hw, self.num_groups, self.scale[...], self.bias[...],
                              self.eps, self.dtype)
    g = self.num_groups
    x32 = x.astype(jnp.float32)
    xg = x32.reshape(x.shape[:-1] + (g, x.shape[-1] // g))   # [B, ..., G, C/G]
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)           # all but batch and group
    mean = xg.mean(axes, keepdims=True)
    var = jnp.square(xg - mean).mean(axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Embedding(nnx.Module):
  """A learned table [num, dim] (torch nn.Embedding; the leaf converts to `.weight`)."""

  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Param(normal(1.0)(rngs, (num, dim), dim, num))  # nn.Embedding: N(0, 1)

  def __call__(self) -> jax.Array:
    return self.embedding[...]


class Conv2d(nnx.Module):
  """NHWC convolution with a [kh, kw, in, out] kernel and torch-style padding."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, use_bias: bool = True, kernel_std: float | None = None,
               init: LinearInit = TORCH_DEFAULT, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    """init: the reference's init of this conv (default torch's nn.Conv2d); kernel_std,
    if given, makes the kernel N(0, kernel_std^2) instead."""
    shape = (kernel_size, kernel_size, in_ch, out_ch)
    fans = (in_ch * kernel_size * kernel_size, out_ch * kernel_size * kernel_size)
    kernel_init = init.kernel if kernel_std is None else normal(kernel_std)
    self.kernel = nnx.Param(kernel_init(rngs, shape, *fans))
    self.bias = nnx.Param(init.bias(rngs, (out_ch,), *fans)) if use_bias else None
    self.stride = stride
    self.padding = padding
    self.dtype = dtype

  def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, Cin] -> [B, Ho, Wo, Cout]. valid_hw: [B, 2] each image's map in the
    canvas x (models/valid.py): zero padding beyond it, as the image's own border."""
    if valid_hw is not None and self.padding:
      x = valid.mask(x, valid_hw)
    if self.kernel.shape[:2] == (1, 1) and self.stride == 1 and self.padding == 0:
      # A 1x1 convolution is a matmul over the channels, and is computed as one: XLA:CPU
      # computed conv_seg's kernel gradient by first transposing its [B, 128, 128, 256]
      # input to [256, 128, 128, B] (115 ms of a SeMask-T training step on 2 cores).
      return linear(x, self.kernel[0, 0], None if self.bias is None else self.bias[...],
                    self.dtype)
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), weight(self.kernel[...], self.dtype),
        window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = add_bias(y, self.bias[...])
    return y


class BatchNorm(nnx.Module):
  """torch.nn.BatchNorm2d semantics over the last axis of NHWC inputs.

  Training normalises with the biased batch variance and updates the running
  variance with the unbiased one (as torch does), so that statistics carried
  over from or to a reference checkpoint mean the same thing. Under jit with
  the batch sharded over a mesh, the mean over the batch axis is a global
  reduction: this is SyncBN without any explicit collective.
  """

  def __init__(self, dim: int, *, eps: float = 1e-5, momentum: float = 0.1):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
    self.eps = eps
    self.momentum = momentum

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if not train:
      return _batch_norm(x, self.scale[...], self.bias[...], self.mean[...], self.var[...],
                         self.eps)
    y, mean, var = _batch_norm_train(x, self.scale[...], self.bias[...], self.eps)
    n = np.prod(x.shape[:-1])
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
    self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    return y


def _batch_norm(x, scale, bias, mean, var, eps):
  y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps) * scale + bias
  return y.astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, batch mean, biased batch variance), rematerialised like _layer_norm: the backward
  keeps x (compute dtype) instead of float32 maps of the centred input and broadcasts."""
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axes)
  var = jnp.square(x32 - mean).mean(axes)
  return _batch_norm(x, scale, bias, mean, var, eps), mean, var


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, *,
            broadcast_dims: tuple[int, ...] = ()) -> jax.Array:
  """Inverted dropout; identity when rng is None (eval) or rate == 0."""
  if rng is None or rate == 0.0:
    return x
  shape = list(x.shape)
  for d in broadcast_dims:
    shape[d] = 1
  keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def after(x: jax.Array, ct: Any) -> jax.Array:
  """x, made to depend on the cotangent ct: x + 0 * ct[:, :1, :1, :1].

  Equal to x for finite ct (XLA does not fold a float multiply by zero, since
  inf * 0 is nan) but not computable before ct is. One element per example,
  so that a batch-sharded step needs no communication for it.
  """
  ct = jax.tree.leaves(ct)[0]  # [B, ...]; any output's cotangent will do
  corner = ct[(slice(None),) + (slice(0, 1),) * (ct.ndim - 1)]  # [B, 1, 1, 1]
  return x + (corner * 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


class KeyChain:
  """Hands out distinct dropout keys to successive stochastic layers.

  The model takes one key per call; every layer that needs randomness asks
  for the next key in a fixed order, so a given (key, step) is reproducible.
  Returns None throughout when the model runs deterministically.
  """

  def __init__(self, rng: jax.Array | None):
    self._rng = rng
    self._n = 0

  @property
  def deterministic(self) -> bool:
    return self._rng is None

  def next(self) -> jax.Array | None:
    if self._rng is None:
      return None
    self._n += 1
    return jax.random.fold_in(self._rng, self._n)
