"""Small building blocks shared by the backbone and the decoders.

Parameter leaf names follow Flax (`kernel`, `scale`, `bias`); module names
follow the reference PyTorch checkpoint so that conversion is a name map.
Norms, softmaxes and the loss run in float32 whatever the compute dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator

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
  """Every Linear of the reference backbone ends up trunc_normal(std=0.02) with
  bounds (-2, 2) in absolute terms, i.e. effectively an untruncated normal."""
  return normal_init(rngs, shape, 0.02)


_SQRT_HALF = np.float32(0.7071067811865476)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch.nn.GELU(); Flax's default is the tanh form.

  torch's formula x * 0.5 * (1 + erf(x / sqrt(2))), computed in float32 as torch's
  bfloat16 kernels do, written x * (0.5 + 0.5 * erf(.)) (the same value: halving is
  exact). jax.nn.gelu(approximate=False) is x * erfc(-x / sqrt(2)) / 2 in the input's
  dtype: in bfloat16 it scales by a bfloat16 sqrt(1/2) and XLA:GPU split it into two
  passes over the MLP's hidden map. This form is one pass: on an H200 (deviceless,
  PERF_NOTES) SeMask-T inference moves 13 % fewer bytes and SeMask-B training 4 %; on
  the CPU the float32 training step is 2-5 % faster and has the fewest XLA temporaries
  of the forms tried. (Under XLA:CPU's default YNNPACK reduce fusions its two constants
  become full-size maps at inference, +31 MB for SeMask-T; the tuned evaluation list of
  config.xla_cpu_ynn_fusions has no such fusions.)
  """
  x32 = x.astype(jnp.float32)
  return (x32 * (0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


class Linear(nnx.Module):
  """y = x @ kernel + bias with the reference initialisation; kernel [in, out]."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(linear_init(rngs, (in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear(x, self.kernel[...], None if self.bias is None else self.bias[...],
                  self.dtype)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
  """Linear.__call__ on plain arrays (for jax transforms that take arrays, not modules)."""
  y = jnp.einsum("...i,io->...o", x.astype(dtype), weight(kernel, dtype))
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


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
    self.embedding = nnx.Param(normal_init(rngs, (num, dim), 1.0))

  def __call__(self) -> jax.Array:
    return self.embedding[...]


class Conv2d(nnx.Module):
  """NHWC convolution with a [kh, kw, in, out] kernel and torch-style padding."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, use_bias: bool = True, kernel_std: float | None = None,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_ch, out_ch)
    fan_in = in_ch * kernel_size * kernel_size
    if kernel_std is None:  # torch's default Conv2d init: kaiming_uniform(a=sqrt(5)).
      self.kernel = nnx.Param(uniform_init(rngs, shape, 1.0 / np.sqrt(fan_in)))
    else:
      self.kernel = nnx.Param(normal_init(rngs, shape, kernel_std))
    self.bias = nnx.Param(uniform_init(rngs, (out_ch,), 1.0 / np.sqrt(fan_in))) if use_bias else None
    self.stride = stride
    self.padding = padding
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
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
      y = y + self.bias[...].astype(self.dtype)
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
