"""SeMask Swin backbone, segmentation flavour (SPEC section 1).

Layout is NHWC throughout ([B, H, W, C] token grids). Differences from the
classification Swin that matter for equal numbers: any input size (zero
padding to multiples of 4, of the window, and to even sizes before merging),
padding after norm1 with padded tokens taking part in attention, and the
shift in every odd block of every stage whatever the map size.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from semask_jax.models import layers
from semask_jax.models import valid
from semask_jax.models.config import (INIT_MMSEG, REMAT_POLICIES, BackboneConfig,
                                      resolve_block_loop)
from semask_jax.models.semantic_layer import SemanticLayer
from semask_jax.models.windows import (pad_to_multiple, relative_position_index, shift_mask,
                                       window_partition, window_reverse)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------

class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs,
               init: layers.LinearInit = layers.TRUNC_NORMAL):
    self.fc1 = layers.Linear(dim, hidden, init=init, dtype=dtype, rngs=rngs)
    self.fc2 = layers.Linear(hidden, dim, init=init, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # GELU and fc2 rematerialised: the backward pass keeps fc1's output alone and
    # recomputes the GELU (element-wise) instead of keeping its output and the erf/exp
    # intermediates of its derivative, four maps of the hidden width (4C) per block:
    # 7.8 of SeMask-B's 27 GiB of saved activations at batch 16 in bfloat16. Same values
    # and gradients.
    fc2 = self.fc2
    return _gelu_linear(self.fc1(x), fc2.kernel[...],
                        None if fc2.bias is None else fc2.bias[...], fc2.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _gelu_linear(h: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
  """fc2(gelu(h)) on arrays: a jax.checkpoint of a module (nnx.remat) cannot run where
  the module is a constant of an outer jax.jit (jax.jit(model.segment))."""
  return layers.linear(layers.gelu(h), kernel, bias, dtype)


class WindowAttention(nnx.Module):
  """Multi-head attention inside m x m windows with the relative position bias."""

  def __init__(self, dim: int, num_heads: int, window_size: int, *, dtype, rngs: nnx.Rngs,
               impl: str = "einsum", init: layers.LinearInit = layers.TRUNC_NORMAL):
    self.num_heads = num_heads
    self.impl = impl
    self.window_size = window_size
    self.scale = (dim // num_heads) ** -0.5
    self.relative_position_bias_table = nnx.Param(
        layers.linear_init(rngs, ((2 * window_size - 1) ** 2, num_heads)))
    self.qkv = layers.Linear(dim, 3 * dim, init=init, dtype=dtype, rngs=rngs)
    self.proj = layers.Linear(dim, dim, init=init, dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def relative_bias(self) -> jax.Array:
    """[heads, N, N] float32."""
    n = self.window_size ** 2
    idx = relative_position_index(self.window_size).reshape(-1)
    bias = self.relative_position_bias_table[...][idx].reshape(n, n, self.num_heads)
    return bias.transpose(2, 0, 1)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x: [B, nW, N, C]; mask: [nW, N, N], per image [B, nW, N, N], or None."""
    return self.proj(self.attend(self.qkv(x), mask))

  def attend(self, qkv: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The attention proper, between the qkv and proj Linears.

    qkv: [B, nW, N, 3C] -> [B, nW, N, C] (heads concatenated, before proj).
    """
    b, nw, n, c3 = qkv.shape
    c, h = c3 // 3, self.num_heads
    qkv = qkv.reshape(b, nw, n, 3, h, c // h)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [B, nW, N, h, d]
    per_image = mask is not None and mask.ndim == 4  # valid-size forward: einsum path
    if self.impl in ("fused", "cudnn") and not per_image:
      return self._fused(q, k, v, mask).reshape(b, nw, n, c)
    q = q * jnp.asarray(self.scale, q.dtype)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32)
    logits = logits + self.relative_bias()[None, None]
    if per_image:
      logits = logits + mask[:, :, None]
    elif mask is not None:
      logits = logits + jnp.asarray(mask)[None, :, None]
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    attn = checkpoint_name(attn, "attn")
    return jnp.einsum("bwhqk,bwkhd->bwqhd", attn, v).reshape(b, nw, n, c)

  def _fused(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
             even_tokens: bool | None = None) -> jax.Array:
    """jax.nn.dot_product_attention with the windows as heads: q, k, v [B, nW, N, h, d]
    -> [B, N, nW * h, d].

    The relative-position bias (per head) and the shift mask (per window) are then one
    additive bias [1, nW * h, N, N] shared by all images: cuDNN takes a bias whose batch
    is 1 or whole, and one of batch 1 stays small (SeMask-B stage 1 at 512: 20 MB against
    the 0.3 GB of a per-window bias tiled over a batch of 16), gradient included. The
    bias enters in the compute dtype (the einsum path adds it in float32, as the
    reference does under AMP: in bfloat16 the two differ by the bias's rounding).
    impl 'fused': JAX picks the implementation (XLA's today); 'cudnn': cuDNN's fused
    flash attention (NVIDIA GPUs, bfloat16 / float16), which never writes the
    [B, nW, h, N, N] scores to memory.

    even_tokens (default: impl == 'cudnn'): cuDNN trains with a bias only on an even
    token count, and window 7 has 49; an odd window gets one zero token whose key the
    bias hides (a large negative logit: its softmax weight is exactly 0) and whose
    output row is dropped. The same function; a 4 % larger attention.
    """
    b, nw, n, h, d = q.shape
    bias = jnp.broadcast_to(self.relative_bias()[None], (nw, h, n, n))
    if mask is not None:
      bias = bias + jnp.asarray(mask)[:, None]  # [nW, h, N, N]
    bias = bias.astype(q.dtype)
    heads = lambda t: t.transpose(0, 2, 1, 3, 4).reshape(b, n, nw * h, d)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    pad = int(n % 2 == 1 and (self.impl == "cudnn" if even_tokens is None else even_tokens))
    if pad:
      q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
      hidden = jnp.asarray(_LARGE_NEGATIVE[jnp.dtype(q.dtype).name], q.dtype)
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, 0)))  # the extra query: any row
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=hidden)
    try:
      out = jax.nn.dot_product_attention(
          q, k, v, bias=bias.reshape(1, nw * h, n + pad, n + pad), scale=float(self.scale),
          implementation="cudnn" if self.impl == "cudnn" else None)
    except (NotImplementedError, RuntimeError) as e:  # JAX's cuDNN checks, at trace time
      if self.impl != "cudnn":
        raise
      raise ValueError(
          f"attention_impl='cudnn': cuDNN refused this window attention ({n} tokens per "
          f"window, head dim {d}, {q.dtype}): {str(e).rstrip('.')}. Use "
          f"attention_impl='einsum' (cuDNN needs an NVIDIA GPU and bfloat16 or float16)") from e
    return out[:, :n].reshape(b, n, nw, h, d).transpose(0, 2, 1, 3, 4)


# A logit that softmax weighs exactly 0 and that cuDNN handles (JAX's own choice for its
# masks: cuDNN mishandles differences of two values near the dtype's limit).
_LARGE_NEGATIVE = {"bfloat16": -2.0 ** 41, "float16": -2.0 ** 15, "float32": -1e30}


class SwinBlock(nnx.Module):
  """(Shifted) window attention + MLP, pre-norm, with stochastic depth."""

  def __init__(self, dim: int, num_heads: int, window_size: int, shift: int,
               drop_path: float, *, dtype, rngs: nnx.Rngs, attention_impl: str = "einsum",
               init: layers.LinearInit = layers.TRUNC_NORMAL):
    self.window_size = window_size
    self.shift = shift
    self.drop_path = drop_path
    self.norm1 = layers.LayerNorm(dim, dtype=dtype)
    self.attn = WindowAttention(dim, num_heads, window_size, dtype=dtype, rngs=rngs,
                                impl=attention_impl, init=init)
    self.norm2 = layers.LayerNorm(dim, dtype=dtype)
    self.mlp = Mlp(dim, 4 * dim, dtype=dtype, rngs=rngs, init=init)

  def __call__(self, x: jax.Array, keys: layers.KeyChain,
               keep_prob: jax.Array | None = None,
               valid_hw: jax.Array | None = None) -> jax.Array:
    """x: [B, H, W, C]. keys: hands out the block's two drop-path draws ([B] uniforms, see
    drop_path; None when deterministic). keep_prob: traced 1 - drop_path (the stage
    scan's), else the attribute. valid_hw: [B, 2] int32 token grid of each image (see
    models/valid.py), or None (x is the image's whole map)."""
    b, h, w, c = x.shape
    m, s = self.window_size, self.shift
    if valid_hw is not None:
      x = x + self._attention_valid(x, valid_hw, h, w)  # inference: no drop path
      return x + self.mlp(self.norm2(x))
    # qkv runs on the real tokens only; the tokens that padding adds after norm1
    # are zeros, whose qkv is exactly the bias, so they are filled in as such.
    # proj runs after the crop. Same numbers as padding first, without the
    # wasted Linear work on padded tokens (stage 3 at 512: 21^2 vs 16^2 tokens).
    y = self.attn.qkv(self.norm1(x))
    y = pad_to_multiple(y, m, fill=self.attn.qkv.bias[...].astype(y.dtype))
    hp, wp = y.shape[1:3]
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
    y = window_partition(y, m)
    y = self.attn.attend(y, shift_mask(hp, wp, m, s) if s else None)
    y = window_reverse(y, m, hp, wp)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    y = self.attn.proj(y[:, :h, :w])
    keep = 1.0 - self.drop_path if keep_prob is None else keep_prob
    x = x + drop_path(y, keep, keys.next())
    x = x + drop_path(self.mlp(self.norm2(x)), keep, keys.next())
    return x

  def _attention_valid(self, x: jax.Array, hw: jax.Array, h: int, w: int) -> jax.Array:
    """The attention branch per image: the padding after norm1 (qkv bias) from its own
    valid size, the roll and the shift mask over its own padded map (Hp, Wp)."""
    m, s = self.window_size, self.shift
    bias = self.attn.qkv.bias[...]
    y = valid.pad_canvas(self.attn.qkv(self.norm1(x)), m)              # [B, Hc, Wc, 3C]
    y = valid.mask(y, hw, bias.astype(y.dtype))
    hc, wc = y.shape[1:3]
    extent = valid.round_up(hw, m)                                     # [B, 2] (Hp, Wp)
    if s:
      y = valid.roll(y, -s, extent)
    y = self.attn.attend(window_partition(y, m),
                         valid.shift_mask(extent, (hc, wc), m, s) if s else None)
    y = window_reverse(y, m, hc, wc)
    if s:
      y = valid.roll(y, s, extent)
    return self.attn.proj(y[:, :h, :w])


def drop_path(x: jax.Array, keep_prob: float | jax.Array, u: jax.Array | None) -> jax.Array:
  """Stochastic depth: sample b's branch kept (divided by keep_prob) where u[b] < keep_prob.

  u: [B] uniform [0, 1) draws of this drop path (a row of its stage's one draw, see
  BasicLayer._blocks), or None (deterministic). keep_prob: a float, or the stage scan's
  traced float32 scalar. Bernoulli(keep_prob) per sample, as jax.random.bernoulli (which
  compares a uniform draw the same way); at keep 1 every sample is kept, divided by 1.
  """
  if u is None or (isinstance(keep_prob, float) and keep_prob == 1.0):
    return x
  keep = (u < keep_prob).reshape((-1,) + (1,) * (x.ndim - 1))  # [B, 1, 1, 1]
  scale = (keep_prob.astype(x.dtype) if isinstance(keep_prob, jax.Array)
           else keep_prob)  # a Python float stays weakly typed
  return jnp.where(keep, x / scale, jnp.zeros_like(x))


class PatchMerging(nnx.Module):
  """2x2 neighbourhood concat (reference channel order) -> LN(4C) -> Linear(4C, 2C)."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs,
               init: layers.LinearInit = layers.TRUNC_NORMAL):
    self.norm = layers.LayerNorm(4 * dim, dtype=dtype)
    self.reduction = layers.Linear(4 * dim, 2 * dim, use_bias=False, init=init, dtype=dtype,
                                   rngs=rngs)

  def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
    """valid_hw: the token grid of each image (its merge pads with zeros after it)."""
    if valid_hw is not None:
      x = valid.mask(x, valid_hw)
    x = pad_to_multiple(x, 2)
    x = jnp.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    return self.reduction(self.norm(x))


class PatchEmbed(nnx.Module):
  """Zero-pad to a multiple of 4, Conv 4x4 stride 4, LayerNorm."""

  def __init__(self, embed_dim: int, patch_size: int = 4, *, dtype, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.proj = layers.Conv2d(3, embed_dim, patch_size, stride=patch_size, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(embed_dim, dtype=dtype)

  def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
    """valid_hw: each image's pixel size: zeros beyond it, as the reference's pad."""
    if valid_hw is not None:
      x = valid.mask(x, valid_hw)
    return self.norm(self.proj(pad_to_multiple(x, self.patch_size)))


class BasicLayer(nnx.Module):
  """One stage: Swin blocks, an optional semantic layer, optional patch merging."""

  def __init__(self, dim: int, depth: int, num_heads: int, window_size: int,
               drop_paths: Sequence[float], *, num_classes: int, num_sem_blocks: int,
               sem_window_size: int, sem_global: bool, use_gamma: bool, sem_attention: str,
               sem_dropout: float, downsample: bool, remat: bool, dtype, rngs: nnx.Rngs,
               remat_policy: str = "full", attention_impl: str = "einsum",
               block_loop: str = "auto", init: layers.LinearInit = layers.TRUNC_NORMAL,
               sem_init: str = "trunc_normal"):
    """init: the Swin Linears' init; sem_init: the semantic attention's
    (BackboneConfig.semantic_init)."""
    self.blocks = nnx.List([
        SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2,
                  drop_paths[j], dtype=dtype, rngs=rngs, attention_impl=attention_impl,
                  init=init)
        for j in range(depth)])
    self.semantic_layer = (
        SemanticLayer(dim, num_classes, num_sem_blocks, window_size=sem_window_size,
                      global_attention=sem_global, use_gamma=use_gamma,
                      attention=sem_attention, dropout=sem_dropout, init=sem_init,
                      dtype=dtype, rngs=rngs)
        if num_sem_blocks > 0 else None)
    self.downsample = (PatchMerging(dim, dtype=dtype, rngs=rngs, init=init) if downsample
                       else None)
    self.remat = remat
    self.remat_policy = remat_policy
    self.scan_blocks = resolve_block_loop(block_loop)  # training only; see _blocks

  def __call__(self, x: jax.Array, keys: layers.KeyChain, valid_hw: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Returns (stage output, semantic map or None, input of the next stage or None).
    valid_hw: [B, 2] token grid per image (inference only; see models/valid.py).

    Named scopes ('blocks', 'semantic_layer', 'downsample', under the stage's
    'layers.{i}') label the HLO ops by part, for profiles (jax.profiler traces)."""
    if valid_hw is not None:
      return self._call_valid(x, keys, valid_hw)
    with jax.named_scope("blocks"):
      x = self._blocks(x, keys)
    sem = None
    if self.semantic_layer is not None:
      with jax.named_scope("semantic_layer"):
        x, sem = self._apply(self.semantic_layer, x, keys,
                             num_keys=len(self.semantic_layer.class_injection))
    nxt = None
    if self.downsample is not None:
      with jax.named_scope("downsample"):
        nxt = self.downsample(x)
    return x, sem, nxt

  def _call_valid(self, x: jax.Array, keys: layers.KeyChain, hw: jax.Array
                  ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The stage at inference on a canvas with per-image token grids hw [B, 2]."""
    if not keys.deterministic:
      raise ValueError("the valid-size forward is for inference (train=False)")
    with jax.named_scope("blocks"):
      for blk in self.blocks:
        x = blk(x, keys, None, hw)
    sem = None
    if self.semantic_layer is not None:
      with jax.named_scope("semantic_layer"):
        x, sem = self.semantic_layer(x, keys, hw)
    nxt = None
    if self.downsample is not None:
      with jax.named_scope("downsample"):
        nxt = self.downsample(x, hw)
    return x, sem, nxt

  def _blocks(self, x: jax.Array, keys: layers.KeyChain) -> jax.Array:
    """The Swin blocks, as (regular, shifted) pairs under one lax.scan.

    XLA then compiles one pair per stage whatever its depth (SeMask-B stage 3:
    one pair instead of 18 blocks). Within a parity the blocks differ only in
    their parameters and drop-path rate, so the scan carries x and runs over the
    stacked parameters of the even and of the odd blocks (a copy of the stage's
    weights per step, small next to its activations), their drop-path draws and rates.
    The parameters stay in the per-block modules (names layers.{i}.blocks.{j}.*).
    The stage's drop-path draws are one uniform [2 * depth, B], rows in block order, so
    the scan's draws are those of the unrolled loop. A trailing block of an odd depth runs
    after the scan. config block_loop='unroll' (the default on accelerators, 'auto')
    unrolls: the same values, no per-iteration copies of the scan's residuals.

    Inference (no keys) unrolls: there the stacked copy of the stage's weights is
    most of the step's temporary memory (SeMask-B at 512x512 on CPU: 360 MB of
    temporaries scanned, 178 MB unrolled, 5 % faster, the same compile time).
    """
    depth = len(self.blocks)
    # One draw for the stage's drop paths (two per block: after attention, after MLP):
    # one random-bits computation instead of a key and a draw per drop path (fewer
    # kernels to compile, on the CPU ~80 for SeMask-T).
    key = keys.next()
    u = None if key is None else jax.random.uniform(key, (2 * depth, x.shape[0]))  # [2d, B]
    us = [None if u is None else u[i] for i in range(2 * depth)]
    scan = self.scan_blocks and not keys.deterministic
    pairs = depth // 2 if scan else 0
    if pairs:
      stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
      even = stack([nnx.state(self.blocks[2 * i]) for i in range(pairs)])  # [pairs, ...]
      odd = stack([nnx.state(self.blocks[2 * i + 1]) for i in range(pairs)])
      keep = np.asarray([[1.0 - self.blocks[j].drop_path for j in (2 * i, 2 * i + 1)]
                         for i in range(pairs)], np.float32)  # [pairs, 2]
      pair_u = None if u is None else u[:4 * pairs].reshape(pairs, 4, -1)  # [pairs, 4, B]
      g_even, g_odd = nnx.graphdef(self.blocks[0]), nnx.graphdef(self.blocks[1])

      def pair(x, xs):
        s_even, s_odd, pu, kp = xs
        pu = [None] * 4 if pu is None else [pu[i] for i in range(4)]
        x = self._apply_block(g_even, s_even, x, pu[:2], kp[0])
        x = self._apply_block(g_odd, s_odd, x, pu[2:], kp[1])
        return x, None

      x, _ = jax.lax.scan(pair, x, (even, odd, pair_u, jnp.asarray(keep)))
    for j in range(2 * pairs, depth):
      blk = self.blocks[j]
      x = self._apply_block(nnx.graphdef(blk), nnx.state(blk), x, us[2 * j:2 * j + 2], None)
    return x

  def _apply_block(self, graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array,
                   us: list[jax.Array | None], keep_prob: jax.Array | None) -> jax.Array:
    """A Swin block given as (graphdef, state) and its two drop-path draws (us),
    rematerialised when self.remat."""
    def apply(state, x, us, keep_prob):
      return nnx.merge(graphdef, state)(x, _FixedKeys(us), keep_prob)

    if not self.remat:
      return apply(state, x, us, keep_prob)
    if self.remat_policy == "full":
      return _sequenced_remat(apply, state, x, us, keep_prob)
    return jax.checkpoint(apply, policy=remat_policy_fn(self.remat_policy))(
        state, x, us, keep_prob)

  def _apply(self, module: nnx.Module, x: jax.Array, keys: layers.KeyChain, num_keys: int):
    """module(x, keys), rematerialised in the backward pass when self.remat, in training
    only: inference has no backward pass, and there an nnx.remat of a module that is a
    constant of an outer jax.jit (jax.jit(model.segment)) cannot run."""
    if not self.remat or keys.deterministic:
      return module(x, keys)
    # Keys are drawn outside the rematerialised function so the chain stays in order.
    sub = [keys.next() for _ in range(num_keys)]
    if self.remat_policy == "full":
      return sequenced_remat(module, x, sub)
    return nnx.remat(lambda m, x, k: m(x, _FixedKeys(k)),
                     policy=remat_policy_fn(self.remat_policy))(module, x, sub)


def sequenced_remat(block: nnx.Module, x: jax.Array, keys: list[jax.Array]) -> Any:
  """block(x, keys) whose backward pass recomputes the forward, like
  jax.checkpoint, but only once the block's output cotangent exists.

  `block` is a Swin block or a semantic layer: no state updates (no BatchNorm),
  randomness only from `keys`.

  With plain jax.checkpoint, XLA:CPU (whose scheduler ignores optimization
  barriers) starts the recomputations of several blocks early and keeps them
  all live, so remat used *more* memory than no remat. Here the recomputation
  reads the block input through `layers.after(x, ct)`, so blocks are recomputed one
  at a time, in backward order. Same values and gradients as jax.checkpoint.
  """
  graphdef, state = nnx.split(block)
  return _sequenced_remat(lambda s, y, k: nnx.merge(graphdef, s)(y, _FixedKeys(k)),
                          state, x, keys)


def _sequenced_remat(apply: Any, state: Any, x: jax.Array, keys: Any, *consts: Any) -> Any:
  """apply(state, x, keys, *consts) rematerialised as in `sequenced_remat`.

  keys and consts (drop-path keep probabilities) get no gradient.
  """

  @jax.custom_vjp
  def run(state, x, keys, consts):
    return apply(state, x, keys, *consts)

  def fwd(state, x, keys, consts):
    return apply(state, x, keys, *consts), (state, x, keys, consts)

  def bwd(res, ct):
    state, x, keys, consts = res
    x = layers.after(x, ct)
    # Fresh copies of the parameters for the recomputation: otherwise XLA merges
    # its parameter-only values (broadcast norm scales and biases, the relative
    # position bias + shift mask) with the forward's and keeps them live in between.
    state, x = jax.lax.optimization_barrier((state, x))
    _, vjp = jax.vjp(lambda s, y: apply(s, y, keys, *consts), state, x)
    d_state, d_x = vjp(ct)
    return d_state, d_x, None, None

  run.defvjp(fwd, bwd)
  return run(state, x, keys, consts)


def remat_policy_fn(name: str):
  """What a rematerialised Swin block saves for the backward pass.

  full: nothing but its input (least memory, one extra forward per block); the
    model runs it as `sequenced_remat`, not through this policy;
  dots: every matmul output (the backward recomputes only element-wise work);
  dots_no_batch: the Linear outputs, not the attention matmuls (whose
    [windows, heads, N, N] logits are the largest activations);
  attn: everything except what is tagged 'attn' (logits / softmax).
  """
  cp = jax.checkpoint_policies
  policies = {"full": None, "dots": cp.dots_saveable,
              "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
              "attn": cp.save_anything_except_these_names("attn")}
  assert set(policies) == set(REMAT_POLICIES)  # the names ModelConfig validates
  return policies[name]


class _FixedKeys(layers.KeyChain):
  """A KeyChain replaying a fixed list: keys (semantic layers under remat) or a Swin
  block's two drop-path draws."""

  def __init__(self, ks):
    super().__init__(None)
    self._ks = list(ks)

  def next(self):
    return self._ks.pop(0)


class SeMaskSwin(nnx.Module):
  """SeMask Swin: four stages, feature maps at strides 4, 8, 16, 32 through norm0..norm3."""

  def __init__(self, config: BackboneConfig, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.dtype)
    # SPEC 13: mmseg re-draws every backbone Linear trunc_normal(0.02) with bias 0;
    # detectron2 leaves them at torch's default. The patch-embedding conv is torch's
    # default and the position tables trunc_normal(0.02) on both paths.
    init = layers.TRUNC_NORMAL if c.init_path == INIT_MMSEG else layers.TORCH_DEFAULT
    self.num_stages = c.num_stages
    self.patch_embed = PatchEmbed(c.embed_dim, dtype=dtype, rngs=rngs)
    dpr = np.linspace(0.0, c.drop_path_rate, sum(c.depths)).tolist()
    stage_layers = []
    for i, depth in enumerate(c.depths):
      start = sum(c.depths[:i])
      stage_layers.append(BasicLayer(
          c.widths[i], depth, c.num_heads[i], c.window_size, dpr[start:start + depth],
          num_classes=c.num_classes, num_sem_blocks=c.num_sem_blocks[i],
          sem_window_size=c.sem_window_size, sem_global=c.sem_global[i],
          use_gamma=c.use_gamma, sem_attention=c.sem_attention, sem_dropout=c.sem_dropout,
          downsample=i < c.num_stages - 1, remat=c.remat, remat_policy=c.remat_policy,
          attention_impl=c.attention_impl, block_loop=c.block_loop, init=init,
          sem_init=c.semantic_init, dtype=dtype, rngs=rngs))
    self.layers = nnx.List(stage_layers)
    for i in range(c.num_stages):
      setattr(self, f"norm{i}", layers.LayerNorm(c.widths[i], dtype=dtype))

  def __call__(self, x: jax.Array, keys: layers.KeyChain, valid_hw: jax.Array | None = None
               ) -> tuple[list[jax.Array], list[jax.Array | None]]:
    """x: [B, H, W, 3] -> (feats [B, H/4/2^i, W/4/2^i, C_i], sems [..., K] or None).

    valid_hw: [B, 2] int32 pixel size of each image in the canvas x (inference): each
    map's valid region is then that image's own map (sizes: stage_sizes)."""
    sizes = stage_sizes(valid_hw, self.num_stages) if valid_hw is not None else None
    with jax.named_scope("patch_embed"):
      x = self.patch_embed(x, valid_hw)
    feats, sems = [], []
    for i, stage in enumerate(self.layers):
      with jax.named_scope(f"layers.{i}"):
        out, sem, x = stage(x, keys, None if sizes is None else sizes[i])
        feats.append(getattr(self, f"norm{i}")(out))
      sems.append(sem)
    return feats, sems


def stage_sizes(valid_hw: jax.Array, num_stages: int = 4) -> list[jax.Array]:
  """The token grids [B, 2] of each stage for images of pixel sizes valid_hw: ceil(/4),
  then ceil(/2) per patch merging (the reference pads to even sizes before merging)."""
  sizes = [valid.ceil_div(valid_hw, 4)]
  for _ in range(num_stages - 1):
    sizes.append(valid.ceil_div(sizes[-1], 2))
  return sizes
