"""The matrix product under the convolutions: low-precision operands, float32 accumulation, in the
forward product and in both backward products.

`jnp.dot` of two bfloat16 arrays returns bfloat16, and autodiff's backward products then mix a
bfloat16 operand with whatever the cotangent is. On XLA's CPU backend only a bfloat16 x bfloat16
-> float32 product with row-major operands runs on the native bfloat16 GEMM (AVX512-BF16: ~370
GFLOP/s on the benchmark machine); bfloat16 results or transposed operands fall back to a float32
GEMM at ~130-150 (benchmarks/RESULTS.md). :func:`conv_matmul` therefore asks for float32
accumulation explicitly in all three products (exactly what GPU / TPU GEMMs do anyway) and, on
the CPU backend only, hands the backward products physically transposed operands. Float32 /
float64 inputs take the same path at their own precision (float64 stays float64).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def _accumulator(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def row_major_transpose(x_AxB: jax.Array) -> jax.Array:
    """``x.T`` [B, A], materialised row-major on the CPU backend (a 1-D reshape admits only one
    layout, and the barrier keeps XLA from folding the copy back into the product)."""
    if jax.default_backend() != "cpu":
        return x_AxB.T
    return jax.lax.optimization_barrier(x_AxB.T.reshape(-1)).reshape(x_AxB.shape[::-1])


def row_major_batched(x_BxPxK: jax.Array) -> jax.Array:
    """``x`` as [B, K, P], row-major on CPU. The batch stays the major axis, so a batch-sharded
    ``x`` stays sharded (transposing [B*P, K] whole puts the batch minor: GSPMD gathers it)."""
    x_BxKxP = jnp.swapaxes(x_BxPxK, 1, 2)
    if jax.default_backend() != "cpu":
        return x_BxKxP
    b, k, p = x_BxKxP.shape
    return jax.lax.optimization_barrier(x_BxKxP.reshape(b, k * p)).reshape(b, k, p)


def product(spec: str, a: jax.Array, b: jax.Array, out_dtype: Any) -> jax.Array:
    """``einsum(spec, a, b)`` accumulated in float32 (float64 for float64 operands), cast to
    ``out_dtype``."""
    return jnp.einsum(spec, a, b, preferred_element_type=_accumulator(a.dtype)).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_matmul(x_BxPxK: jax.Array, w_KxN: jax.Array, out_dtype: Any) -> jax.Array:
    """``y[b, p] = x[b, p] @ w`` -> ``[B, P, N]`` in ``out_dtype``, accumulated in float32 (or
    float64). ``x`` and ``w`` share one dtype. Gradients: ``dx = g w^T``, ``dw = sum_b x_b^T g_b``,
    both with operands in that dtype and float32 accumulation."""
    if x_BxPxK.dtype != w_KxN.dtype:
        raise TypeError(f"conv_matmul operands differ in dtype: {x_BxPxK.dtype} vs {w_KxN.dtype}")
    return product("bpk,kn->bpn", x_BxPxK, w_KxN, out_dtype)


def _conv_matmul_fwd(x_BxPxK, w_KxN, out_dtype):
    return conv_matmul(x_BxPxK, w_KxN, out_dtype), (x_BxPxK, w_KxN)


def _conv_matmul_bwd(out_dtype, residuals, g_BxPxN):
    x_BxPxK, w_KxN = residuals
    g_BxPxN = g_BxPxN.astype(x_BxPxK.dtype)
    dx_BxPxK = product("bpn,nk->bpk", g_BxPxN, row_major_transpose(w_KxN), x_BxPxK.dtype)
    return dx_BxPxK, _weight_gradient(x_BxPxK, g_BxPxN, w_KxN.dtype)


def _weight_gradient(x_BxPxK: jax.Array, g_BxPxN: jax.Array, dtype: Any) -> jax.Array:
    """``dw = sum_b x_b^T g_b`` [K, N]. On CPU the operand with fewer channels is the one copied
    row-major transposed: ``x^T g`` when K <= N, else ``(g^T x)^T`` (its [N, K] result is
    transposed after a barrier -- left to XLA, the product would be laid out column-major, which
    the CPU's bfloat16 GEMM does not take)."""
    k, n = x_BxPxK.shape[-1], g_BxPxN.shape[-1]
    if jax.default_backend() != "cpu" or k <= n:
        return product("bkp,bpn->kn", row_major_batched(x_BxPxK), g_BxPxN, dtype)
    dw_NxK = product("bnp,bpk->nk", row_major_batched(g_BxPxN), x_BxPxK, dtype)
    return row_major_transpose(jax.lax.optimization_barrier(dw_NxK))


conv_matmul.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)
