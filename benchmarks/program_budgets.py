r"""Budgets on what the compiler makes of our programs (XLA:CPU here, 8 fake devices).

  python benchmarks/program_budgets.py        # ~30 s; exit 1 if any budget is exceeded

These are properties of the compiled or traced program, not of the numbers it computes, so they
depend on the JAX / XLA version and are kept out of the unit tests (tests/ check the values; this
script checks the programs, run it after a JAX upgrade or a change to the code named in a row):
  bank: Eq. 4 reads the bfloat16 bank, and the enqueue rewrites it in place, without a
    float32 copy of the bank (compiled temporaries < 1/4 of the bank's size; memory_bank.py);
  chunks: the chunked pairing loss (Eq. 1/7) never holds the [N, K] logits, forward or
    backward (losses.py, chunking.py);
  sharded: the pairing loss's fast path with pixels sharded over 'data', and the CPU GEMM's
    gradient with the batch sharded, need no all-gather / all-to-all (only reductions);
  depthwise: the CPU depthwise conv copies its input into one padded buffer without autodiff and
    keeps the copy-free form under autodiff (models/cpu_kernels.py).
"""
from __future__ import annotations

import functools
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from ms3_jax.engine import sharding
from ms3_jax.method import losses, memory_bank as mb
from ms3_jax.models.cpu_kernels import conv_matmul, depthwise_conv3x3  # noqa: E402

GATHERS = re.compile(r"all-gather|all-to-all|collective-permute")


def bank_rows() -> list[tuple[str, str, bool]]:
    k, slots, dim, n = 256, 64, 128, 1000
    bank = mb.init_bank(k, slots, dim)  # bfloat16, 4 MiB
    r = np.random.RandomState(0)
    labels = r.randint(0, k, size=n).astype(np.int32)
    emb = r.randn(n, dim).astype(np.float32)
    v_old, v_valid = r.randn(k, dim).astype(np.float32), np.arange(k) % 3 > 0
    budget = bank.feats.nbytes / 4

    def enqueue_then_visual(bank, emb, labels, rng, v_old, v_valid):
        bank = mb.enqueue(bank, emb, labels, rng, per_class=4)
        return bank, mb.visual_embeddings(bank, v_old, v_valid)

    programs = {
        "Eq. 4 from the bank": jax.jit(mb.visual_embeddings).lower(bank, v_old, v_valid),
        "enqueue (donated)": jax.jit(functools.partial(mb.enqueue, per_class=4), donate_argnums=0
                                     ).lower(bank, emb, labels, jax.random.key(0)),
        "enqueue then Eq. 4": jax.jit(enqueue_then_visual, donate_argnums=0).lower(
            bank, emb, labels, jax.random.key(0), v_old, v_valid),
    }
    rows = []
    for name, lowered in programs.items():
        temp = lowered.compile().memory_analysis().temp_size_in_bytes
        rows.append((f"bank: {name}", f"temp {temp / 2**20:.2f} MiB, budget < {budget / 2**20:.2f}",
                     temp < budget))
    return rows


def chunk_rows() -> list[tuple[str, str, bool]]:
    n, k, c, chunk = 4096, 64, 16, 256
    emb, cls = jnp.zeros((n, c)), jnp.zeros((k, c))
    labels = jnp.zeros((n,), jnp.int32)
    rows = []
    for fn in (losses.pairing_loss, losses.pairing_loss_fast):
        text = str(jax.make_jaxpr(jax.grad(lambda e: fn(e, cls, labels, chunk=chunk)))(emb))
        full, per_chunk = f"{n},{k}]" in text, f"{chunk},{k}]" in text
        rows.append((f"chunks: {fn.__name__} forward + backward",
                     f"[N,K] arrays {'present' if full else 'none'}, [chunk,K] "
                     f"{'present' if per_chunk else 'none'}", not full and per_chunk))
    return rows


def sharded_rows() -> list[tuple[str, str, bool]]:
    mesh = sharding.data_mesh(jax.devices()[:8])
    data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    r = np.random.default_rng(0)
    emb = jnp.asarray(r.standard_normal((8, 4, 8, 16)), jnp.float32)
    cls = jnp.asarray(r.standard_normal((20, 16)), jnp.float32)
    labels = jnp.asarray(r.integers(0, 20, (8, 4, 8)), jnp.int32)
    pos = jnp.asarray(r.random((20, 20)) < 0.3)
    loss = jax.jit(jax.value_and_grad(lambda e, c, y, p: losses.pairing_loss_fast(e, c, y, p, chunk=64)),
                   in_shardings=(data, rep, data, rep), out_shardings=(rep, data))
    x = jnp.asarray(r.standard_normal((8, 64, 256)), jnp.bfloat16)
    w = jnp.asarray(r.standard_normal((256, 32)), jnp.bfloat16)
    gemm = jax.jit(jax.grad(lambda x, w: jnp.sum(conv_matmul(x, w, jnp.float32) ** 2), (0, 1)),
                   in_shardings=(data, rep), out_shardings=(data, rep))
    rows = []
    for name, lowered in (("pairing_loss_fast grad", loss.lower(emb, cls, labels, pos)),
                          ("conv_matmul grad", gemm.lower(x, w))):
        hlo = lowered.compile().as_text()
        found = sorted(set(GATHERS.findall(hlo)))
        rows.append((f"sharded: {name}", f"gathers: {', '.join(found) or 'none'}; "
                     f"all-reduce: {'yes' if 'all-reduce' in hlo else 'no'}", not found))
    return rows


def depthwise_rows() -> list[tuple[str, str, bool]]:
    x, k = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 1, 3))
    count = lambda f: str(jax.make_jaxpr(f)(x)).count("dynamic_update_slice")
    forward = count(lambda x: depthwise_conv3x3(x, k, 2))
    grad = count(jax.grad(lambda x: jnp.sum(depthwise_conv3x3(x, k, 2))))
    wide = count(lambda x: depthwise_conv3x3(x, k, 5))  # dilation above half the map: no buffer
    return [("depthwise: padded copies (forward d=2, grad d=2, forward d=5)",
             f"{forward}, {grad}, {wide} (budget 1, 0, 0)", (forward, grad, wide) == (1, 0, 0))]


def main() -> int:
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
    rows = bank_rows() + chunk_rows() + sharded_rows() + depthwise_rows()
    width = max(len(r[0]) for r in rows)
    for name, measured, ok in rows:
        print(f"{'ok  ' if ok else 'OVER'} {name:<{width}}  {measured}")
    failed = [r[0] for r in rows if not r[2]]
    if failed:
        print(f"{len(failed)} budget(s) exceeded: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
