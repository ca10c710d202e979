r"""The products under the convolutions, one by one: why `models/cpu_kernels.py` (GEMMs and tap products).

  python benchmarks/gemm.py            # ~2 min on 2 CPU cores

1. A bfloat16 [M, K] x [K, N] product on XLA's CPU backend: bfloat16 result vs float32
   accumulation (`preferred_element_type`), and with a transposed operand (the backward
   products autodiff writes) vs a physically transposed copy.
2. A 3x3 convolution, forward and forward + backward, bfloat16: `lax.conv_general_dilated` vs
   the tap products of `models/cpu_kernels.py` (`conv_as_tap_products`, `conv_matmul`).
3. In context, forward + backward + an SGD update of the parameters, bfloat16, batch 8 at 224:
   the DeepLab-v3+ decoder head (ASPP with its depthwise branches and image pool, the 3x3
   bottleneck, the stride-4 decoder) and a layer4 bottleneck block (3x3 tap conv, dilation 4).
   `PYTHONPATH=DIR python benchmarks/gemm.py` times the checkout in DIR (before / after).
Each time is the fastest of 5 runs (compiled once); GFLOP/s counts 2 M K N per product.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_time(fn: Callable[..., Any], *args: Any, reps: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def products() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ms3_jax.models import cpu_kernels as gemm

    f32 = dict(preferred_element_type=jnp.float32)
    variants = {
        "x@w -> bf16": lambda x, w, g: jnp.dot(x, w),
        "x@w f32 acc": lambda x, w, g: jnp.dot(x, w, **f32),
        "g@w.T f32 acc": lambda x, w, g: jnp.dot(g, w.T, **f32),
        "g@copy(w.T)": lambda x, w, g: jnp.dot(g, gemm.row_major_transpose(w), **f32),
        "x.T@g f32 acc": lambda x, w, g: jnp.dot(x.T, g, **f32),
        "copy(x.T)@g": lambda x, w, g: jnp.dot(gemm.row_major_transpose(x), g, **f32),
    }
    print("bfloat16 products, GFLOP/s (M x K x N)")
    print(f"{'':>18}" + "".join(f"{name:>15}" for name in variants))
    rng = np.random.default_rng(0)
    for m, k, n in ((6272, 2560, 512), (6272, 1024, 256), (25088, 256, 64), (4096, 4096, 4096)):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        g = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
        row = [2 * m * k * n / best_time(jax.jit(f), x, w, g) / 1e9 for f in variants.values()]
        print(f"{f'{m}x{k}x{n}':>18}" + "".join(f"{r:>15.0f}" for r in row), flush=True)


def convolutions() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ms3_jax.models import cpu_kernels

    def lax_conv(x, k, s, d):
        return jax.lax.conv_general_dilated(x, k, (s, s), ((d, d), (d, d)), rhs_dilation=(d, d),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    print("\nbfloat16 3x3 convolutions, ms forward / forward + backward")
    print(f"{'input, out, stride, dilation':>34}{'lax conv':>16}{'tap products':>16}")
    rng = np.random.default_rng(1)
    for shape, cout, s, d in (((8, 56, 56, 64), 64, 1, 1), ((8, 56, 56, 128), 128, 2, 1),
                              ((8, 28, 28, 256), 256, 1, 2), ((8, 28, 28, 512), 512, 1, 4),
                              ((8, 28, 28, 2560), 512, 1, 1)):
        x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((3, 3, shape[-1], cout)) * 0.05, jnp.bfloat16)
        cells = []
        for f in (lax_conv, cpu_kernels.conv_as_tap_products):
            fwd = jax.jit(lambda x, k, f=f: f(x, k, s, d))
            grad = jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k, s, d).astype(jnp.float32) ** 2),
                                    (0, 1)))
            cells.append(f"{best_time(fwd, x, k) * 1e3:.0f} / {best_time(grad, x, k) * 1e3:.0f}")
        print(f"{f'{shape} {cout} {s} {d}':>34}" + "".join(f"{c:>16}" for c in cells), flush=True)


def in_context() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ms3_jax.models import deeplab, resnet
    from ms3_jax.models.cpu_kernels import CpuConv

    bf16 = jnp.bfloat16
    rng = np.random.default_rng(2)
    layer1 = jnp.asarray(rng.standard_normal((8, 56, 56, 256)), bf16)
    layer4 = jnp.asarray(rng.standard_normal((8, 28, 28, 2048)), bf16)
    cases = {
        "decoder head": (deeplab.DeepLabV3PlusHead(512, 48, (1, 12, 24, 36), bf16, CpuConv), (layer1, layer4)),
        "layer4 block (d=4)": (resnet.Bottleneck(512, CpuConv, dilation=4, dtype=bf16), (layer4,)),
    }
    print("\nforward + backward + SGD update, bfloat16, ms")
    for name, (module, inputs) in cases.items():
        variables = module.init(jax.random.PRNGKey(0), *inputs, train=False)

        def step(params, stats, inputs, module=module):
            def loss(params):
                y, _ = module.apply({"params": params, "batch_stats": stats}, *inputs, train=True,
                                    mutable=["batch_stats"])
                return jnp.mean(jnp.square(y.astype(jnp.float32)))
            grads = jax.grad(loss)(params)
            return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)

        fn = jax.jit(step)
        ms = best_time(fn, variables["params"], variables["batch_stats"], inputs) * 1e3
        print(f"{name:>34}{ms:>10.0f}", flush=True)


def main() -> None:
    if REPO not in sys.path:
        sys.path.append(REPO)
    import jax

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  jax {jax.__version__}, {jax.default_backend()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()}")
    products()
    convolutions()
    in_context()


if __name__ == "__main__":
    main()
