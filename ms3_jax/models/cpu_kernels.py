"""The convolution computed with kernels tuned for XLA's CPU backend: `CpuConv`, a plug-in for
`resnet.Conv` (same params, same numbers; `model.kernels='cpu'`, or 'auto' on CPU devices).

Forms: 1x1 as GEMMs, dense k x k as tap products (:func:`conv_as_tap_products`), the ASPP image
pool as per-image products (:func:`uniform_input_conv`), depthwise 3x3 as 9 shifted taps
(:func:`depthwise_conv3x3`), low-precision operands with float32 accumulation
(:func:`conv_matmul`). Never for GPU / TPU programs. docs/choices.md, "Kernels: one switch,
decided from the compile target", "The CPU plug-in: GEMMs in bfloat16", "Tap-product gradients
written out"; measurements: benchmarks/RESULTS.md, "CPU kernels".
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ms3_jax.models.resnet import Conv


def row_major_transpose(matrix: jax.Array) -> jax.Array:
    """``x.T`` [B, A], materialised row-major (a 1-D reshape admits only one layout, and the
    barrier keeps XLA from folding the copy back into the product)."""
    return jax.lax.optimization_barrier(matrix.T.reshape(-1)).reshape(matrix.shape[::-1])


def row_major_batched(x_BxQxC: jax.Array) -> jax.Array:
    """``x`` as [B, K, P], row-major. The batch stays the major axis, so a batch-sharded ``x``
    stays sharded (transposing [B*P, K] whole puts the batch minor: GSPMD gathers it)."""
    x_BxCxQ = jnp.swapaxes(x_BxQxC, 1, 2)
    b, k, p = x_BxCxQ.shape
    return jax.lax.optimization_barrier(x_BxCxQ.reshape(b, k * p)).reshape(b, k, p)


def product(spec: str, a: jax.Array, b: jax.Array, out_dtype: Any) -> jax.Array:
    """``einsum(spec, a, b)`` accumulated in float32 (float64 for float64 operands), cast to
    ``out_dtype``."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=acc).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_matmul(x_BxQxC: jax.Array, w_CxF: jax.Array, out_dtype: Any) -> jax.Array:
    """``y[b, p] = x[b, p] @ w`` -> ``[B, P, N]`` in ``out_dtype``, accumulated in float32 (or
    float64). ``x`` and ``w`` share one dtype. Gradients: ``dx = g w^T``, ``dw = sum_b x_b^T g_b``,
    both with operands in that dtype and float32 accumulation."""
    if x_BxQxC.dtype != w_CxF.dtype:
        raise TypeError(f"conv_matmul operands differ in dtype: {x_BxQxC.dtype} vs {w_CxF.dtype}")
    return product("bpk,kn->bpn", x_BxQxC, w_CxF, out_dtype)


def _conv_matmul_fwd(x_BxQxC, w_CxF, out_dtype):
    return conv_matmul(x_BxQxC, w_CxF, out_dtype), (x_BxQxC, w_CxF)


def _conv_matmul_bwd(out_dtype, residuals, g_BxQxF):
    x_BxQxC, w_CxF = residuals
    g_BxQxF = g_BxQxF.astype(x_BxQxC.dtype)
    dx_BxQxC = product("bpn,nk->bpk", g_BxQxF, row_major_transpose(w_CxF), x_BxQxC.dtype)
    return dx_BxQxC, _weight_gradient(x_BxQxC, g_BxQxF, w_CxF.dtype)


def _weight_gradient(x_BxQxC: jax.Array, g_BxQxF: jax.Array, dtype: Any) -> jax.Array:
    """``dw = sum_b x_b^T g_b`` [K, N]. The operand with fewer channels is the one copied
    row-major transposed: ``x^T g`` when K <= N, else ``(g^T x)^T`` (its [N, K] result is
    transposed after a barrier -- left to XLA, the product would be laid out column-major, which
    the CPU's bfloat16 GEMM does not take)."""
    k, n = x_BxQxC.shape[-1], g_BxQxF.shape[-1]
    if k <= n:
        return product("bkp,bpn->kn", row_major_batched(x_BxQxC), g_BxQxF, dtype)
    dw_FxC = product("bnp,bpk->nk", row_major_batched(g_BxQxF), x_BxQxC, dtype)
    return row_major_transpose(jax.lax.optimization_barrier(dw_FxC))


conv_matmul.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)


# From this many input channels a dense k x k convolution runs as tap products (where the
# bfloat16 GEMMs beat XLA:CPU's convolution: benchmarks/RESULTS.md "CPU kernels").
TAP_PRODUCTS_MIN_CHANNELS = 256


def conv_as_tap_products(x_BxHxWxC: jax.Array, kernel_JxJxCxF: jax.Array, stride: int,
                         dilation: int, offset_BxHoxWoxF: jax.Array | None = None) -> jax.Array:
    """A dense k x k convolution with PyTorch padding as the sum over its k*k taps of (shifted,
    strided input) @ (tap weights), accumulated in float32 (float64 for float64 inputs), plus
    `offset` (in the accumulator's dtype) before the one rounding to the input dtype. Gradient
    written out: docs/choices.md, "Tap-product gradients written out"."""
    if x_BxHxWxC.dtype != kernel_JxJxCxF.dtype:
        raise TypeError(f"conv_as_tap_products operands differ in dtype: {x_BxHxWxC.dtype} vs "
                        f"{kernel_JxJxCxF.dtype}")
    return _tap_products(x_BxHxWxC, kernel_JxJxCxF, offset_BxHoxWoxF, stride, dilation)


def uniform_input_conv(u_Bx1x1xX: jax.Array, kernel_JxJxXxF: jax.Array, hw: tuple[int, int],
                       stride: int, dilation: int) -> jax.Array:
    """The k x k conv (PyTorch zero padding) of an [H, W] map whose U channels are constant per
    image, ``[B, Ho, Wo, F]`` in the accumulator dtype: output pixel (r, c) sums the products
    ``u @ kernel[i, j]`` of the taps (i, j) that read inside the map (all but the border)."""
    k, _, n_u, _ = kernel_JxJxXxF.shape
    acc = jnp.promote_types(u_Bx1x1xX.dtype, jnp.float32)
    pad, ho, wo, _ = _tap_geometry(hw, k, stride, dilation)
    per_tap_BxJxJxF = product("bu,ijuf->bijf", u_Bx1x1xX.reshape(-1, n_u), kernel_JxJxXxF, acc)
    def inside(n_in: int, n_out: int) -> np.ndarray:  # [k, n_out]: tap i reads inside the map
        pos = np.arange(n_out)[None, :] * stride + np.arange(k)[:, None] * dilation - pad
        return ((pos >= 0) & (pos < n_in)).astype(np.float64)
    rows_JxHo, cols_JxWo = (jnp.asarray(inside(n, m), acc) for n, m in zip(hw, (ho, wo)))
    return jnp.einsum("ir,jc,bijf->brcf", rows_JxHo, cols_JxWo, per_tap_BxJxJxF,
                      precision=jax.lax.Precision.HIGHEST)


def _tap_geometry(hw: tuple[int, int], k: int, s: int, d: int):
    """For an [H, W] input: padding, output size and, per tap, the (start, stop) rows / columns
    it reads of the padded input (every s-th)."""
    pad = d * (k - 1) // 2
    h, w = hw
    ho, wo = (h + 2 * pad - d * (k - 1) - 1) // s + 1, (w + 2 * pad - d * (k - 1) - 1) // s + 1
    taps = [((i, j), (i * d, i * d + (ho - 1) * s + 1), (j * d, j * d + (wo - 1) * s + 1))
            for i in range(k) for j in range(k)]
    return pad, ho, wo, taps


def _taps_of(xp: jax.Array, taps, s: int) -> list[jax.Array]:
    b, c = xp.shape[0], xp.shape[-1]
    return [xp[:, r0:r1:s, c0:c1:s].reshape(b, -1, c) for _, (r0, r1), (c0, c1) in taps]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tap_products(x_BxHxWxC: jax.Array, kernel_JxJxCxF: jax.Array,
                  offset_BxHoxWoxF: jax.Array | None, stride: int, dilation: int) -> jax.Array:
    k, _, _, features = kernel_JxJxCxF.shape
    b = x_BxHxWxC.shape[0]
    pad, ho, wo, taps = _tap_geometry(x_BxHxWxC.shape[1:3], k, stride, dilation)
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    acc = jnp.promote_types(x_BxHxWxC.dtype, jnp.float32)
    y = jnp.zeros((b, ho * wo, features), acc)
    for ((i, j), _, _), tap in zip(taps, _taps_of(xp, taps, stride)):
        y = y + conv_matmul(tap, kernel_JxJxCxF[i, j], acc)
    if offset_BxHoxWoxF is not None:
        y = y + offset_BxHoxWoxF.astype(acc).reshape(y.shape)
    return y.astype(x_BxHxWxC.dtype).reshape(b, ho, wo, features)


def _tap_products_fwd(x, kernel, offset, stride, dilation):
    offset_dtype = None if offset is None else jnp.zeros((), offset.dtype)  # not the whole map
    return _tap_products(x, kernel, offset, stride, dilation), (x, kernel, offset_dtype)


def _tap_products_bwd(stride, dilation, residuals, g_BxHoxWoxF):
    """``dx``: each tap's ``g @ w_tap^T`` (a product rounded to the input dtype, as every
    product here) padded back to where the tap read (strided taps: with interior padding), the
    k*k summed in float32 and rounded once. ``dw``: the k*k products
    ``tap^T g`` stacked once (``g^T tap``, the narrower operand copied transposed, when the
    input has more channels than the output)."""
    x, kernel, offset_dtype = residuals
    k, _, cin, features = kernel.shape
    b, h, w = x.shape[:3]
    s = stride
    pad, ho, wo, taps = _tap_geometry(x.shape[1:3], k, s, dilation)
    hp, wp = h + 2 * pad, w + 2 * pad
    acc = jnp.promote_types(x.dtype, jnp.float32)
    g_BxQxF = g_BxHoxWoxF.astype(x.dtype).reshape(b, ho * wo, features)
    tap_list = _taps_of(jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), taps, s)
    zero = jnp.zeros((), acc)
    dxp = None
    for (i, j), (r0, r1), (c0, c1) in taps:
        dtap = product("bpn,nk->bpk", g_BxQxF, row_major_transpose(kernel[i, j]), x.dtype)
        placed = jax.lax.pad(dtap.reshape(b, ho, wo, cin).astype(acc), zero,
                             ((0, 0, 0), (r0, hp - r1, s - 1), (c0, wp - c1, s - 1), (0, 0, 0)))
        dxp = placed if dxp is None else dxp + placed
    dx = dxp[:, pad:pad + h, pad:pad + w].astype(x.dtype)
    if cin > features:
        g_BxFxQ = row_major_batched(g_BxQxF)  # once for all taps
        dw_TxFxC = jnp.stack([product("bnp,bpk->nk", g_BxFxQ, tap, acc) for tap in tap_list])
        dw = jnp.swapaxes(dw_TxFxC, 1, 2)
    else:
        dw = jnp.stack([product("bkp,bpn->kn", row_major_batched(tap), g_BxQxF, acc)
                        for tap in tap_list])
    d_offset = None if offset_dtype is None else g_BxHoxWoxF.astype(offset_dtype.dtype)
    return dx, dw.reshape(kernel.shape).astype(kernel.dtype), d_offset


_tap_products.defvjp(_tap_products_fwd, _tap_products_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def depthwise_conv3x3(x_BxHxWxC: jax.Array, kernel_3x3x1xC: jax.Array, dilation: int) -> jax.Array:
    """Depthwise 3x3 conv, stride 1, padding = dilation (torch `Conv2d(C, C, 3, padding=d,
    dilation=d, groups=C)`), as a sum of the 9 shifted, per-channel-scaled inputs.

    Same result as `lax.conv_general_dilated(..., feature_group_count=C)`; taps that read only
    padding are skipped. Accumulates in float32 (float64 for float64 inputs); returns the input
    dtype. docs/choices.md, "Depthwise 3x3 on CPU: two forms of the same 9-tap sum".
    """
    return _depthwise(x_BxHxWxC, kernel_3x3x1xC, dilation, padded_copy=True)


@depthwise_conv3x3.defjvp
def _depthwise_jvp(dilation, primals, tangents):
    (x, kernel), (dx, dkernel) = primals, tangents
    y = _depthwise(x, kernel, dilation, padded_copy=False)
    dy = (_depthwise(dx, kernel, dilation, padded_copy=False)
          + _depthwise(x, dkernel, dilation, padded_copy=False))
    return y, dy


def _depthwise(x_BxHxWxC: jax.Array, kernel_3x3x1xC: jax.Array, d: int,
               padded_copy: bool) -> jax.Array:
    """The 9-tap sum; `padded_copy`: ``x`` first written into a zero-padded buffer (only for a
    dilation of at most half the map). ``x`` is cast to the accumulator dtype once, before the taps.
    docs/choices.md, "Depthwise 3x3 on CPU: two forms of the same 9-tap sum"."""
    b, h, w, c = x_BxHxWxC.shape
    acc = jnp.promote_types(x_BxHxWxC.dtype, jnp.float32)
    k = kernel_3x3x1xC.astype(acc)
    offsets = [((i, j), ((i - 1) * d, (j - 1) * d)) for i in range(3) for j in range(3)]
    offsets = [(ij, (di, dj)) for ij, (di, dj) in offsets if abs(di) < h and abs(dj) < w]
    xp = None
    if padded_copy and 2 * d <= min(h, w):
        xp = jax.lax.dynamic_update_slice(
            jnp.zeros((b, h + 2 * d, w + 2 * d, c), x_BxHxWxC.dtype), x_BxHxWxC, (0, d, d, 0))
    x_acc = x_BxHxWxC.astype(acc) if xp is None else None
    out = None
    for (i, j), (di, dj) in offsets:
        if xp is not None:
            term = xp[:, d + di:d + di + h, d + dj:d + dj + w].astype(acc) * k[i, j, 0]
        else:
            src = x_acc[:, max(0, di):h + min(0, di), max(0, dj):w + min(0, dj)]
            term = jnp.pad(src * k[i, j, 0],
                           ((0, 0), (max(0, -di), max(0, di)), (max(0, -dj), max(0, dj)), (0, 0)))
        out = term if out is None else out + term
    return out.astype(x_BxHxWxC.dtype)


class CpuConv(Conv):
    """:class:`resnet.Conv` (same fields, params and init) computed with the kernels above:
    1x1 as one product, depthwise 3x3 as shifted sums, wide k x k as tap products (with the
    image-pool channels as per-image products), anything else as XLA's convolution."""

    @nn.compact
    def __call__(self, x: jax.Array, uniform_Bx1x1xX: jax.Array | None = None) -> jax.Array:
        k, s, d = self.kernel_size, self.stride, self.dilation
        n_uniform = 0 if uniform_Bx1x1xX is None else uniform_Bx1x1xX.shape[-1]
        cin = x.shape[-1] + n_uniform
        kernel = self.kernel_param(cin).astype(self.dtype)
        x = x.astype(self.dtype)
        taps = k > 1 and self.groups == 1 and cin >= TAP_PRODUCTS_MIN_CHANNELS
        if n_uniform and taps:
            offset = uniform_input_conv(uniform_Bx1x1xX.astype(self.dtype), kernel[:, :, :n_uniform],
                                        x.shape[1:3], s, d)
            return self.add_bias(conv_as_tap_products(x, kernel[:, :, n_uniform:], s, d, offset))
        if n_uniform:
            u = jnp.broadcast_to(uniform_Bx1x1xX.astype(self.dtype), x.shape[:3] + (n_uniform,))
            x = jnp.concatenate([u, x], axis=-1)
        if k == 1 and self.groups == 1:
            x = x[:, ::s, ::s] if s > 1 else x
            b, h, w = x.shape[:3]
            y = conv_matmul(x.reshape(b, h * w, cin), kernel.reshape(cin, self.features),
                            self.dtype).reshape(b, h, w, self.features)
        elif k == 3 and s == 1 and self.groups == cin == self.features:
            y = depthwise_conv3x3(x, kernel, d)
        elif taps:
            y = conv_as_tap_products(x, kernel, s, d)
        else:
            pad = d * (k - 1) // 2
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), ((pad, pad), (pad, pad)), rhs_dilation=(d, d),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        return self.add_bias(y)
