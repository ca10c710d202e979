"""The tiny MS3 train step compiled ahead of time for one GPU (H100) and one TPU (v5e) chip.

No accelerator is needed: XLA compiles for `jax.experimental.topologies` devices (compile only;
GPU target description: benchmarks/targets/h100_sxm.txtpb). With `model.kernels='auto'` the step
must compile with native convolutions -- at least one per conv layer, both in the lowered program
and among the compiled kernels (cuDNN conv custom-calls on GPU, k x k `convolution`s on TPU) --
and without optimisation barriers (XLA drops barriers before the optimised HLO, so they are
counted in the lowered program). `model.kernels='cpu'` for the GPU must fail the same check
(barriers, convolutions as products): the check can fail. Helpers: benchmarks/accelerators.py.

Needs the AOT wheels (the `test` extra's `jax[tpu,cuda12-local]`, or `jax[tpu]` plus
`jax-cuda12-plugin` and `jax-cuda12-pjrt`); without them the tests fail, naming the extra.
Cost: two compiles of ~20 s CPU each (XLA's per-kernel work: the tiny model has as many kernels
as a deep one per stage), run in two threads.
"""
from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from ms3_jax.testing.paths import ROOT

pytestmark = pytest.mark.slow  # two accelerator compiles: the full tier (.ci/run)

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA driver: compile only
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu

_spec = importlib.util.spec_from_file_location(
    "ms3_benchmarks_accelerators", os.path.join(ROOT, "benchmarks", "accelerators.py"))
accelerators = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accelerators)

TARGETS = ("h100", "v5e")
# conftest's XLA_FLAGS lower the backend optimisation level for the tests' CPU programs (paths.
# CPU_TEST_XLA_FLAGS); the accelerator compiles here restore XLA's default (3).
DEFAULT_LEVEL = {"xla_backend_optimization_level": 3}


def _lower(target: str, kernels: str):
    devices, _ = accelerators.target_devices(target)
    cfg = accelerators.make_config(tiny=True, step="ms3", kernels=kernels)
    return accelerators.lower_step(cfg, devices, batch=2, size=32)


def _compile(target: str) -> dict:
    lowered, layers = _lower(target, "auto")
    compiled = lowered.compile(DEFAULT_LEVEL)
    stats = accelerators.hlo_stats(compiled.as_text())
    return {"stats": stats, "memory": compiled.memory_analysis(),
            "problems": accelerators.kernel_problems(lowered.as_text(debug_info=True), layers,
                                                     stats)}


@pytest.fixture(scope="module")
def compiled() -> dict:
    """kernels='auto' compiled for each target, two at a time (XLA compiles outside the GIL), not
    from or into conftest's persistent compilation cache: the test is about this compile."""
    import jax

    for target in TARGETS:
        accelerators.require_aot_wheels(target)  # a clear failure, never a skip
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with ThreadPoolExecutor(2) as pool:
            return dict(zip(TARGETS, pool.map(_compile, TARGETS)))
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)


@pytest.mark.parametrize("target", TARGETS)
def test_auto_kernels_compile_native(compiled, target):
    r = compiled[target]
    assert r["memory"].temp_size_in_bytes > 0
    assert r["problems"] == [], r["problems"]
    if target == "h100":
        assert r["stats"]["cudnn_conv"] > 0
    else:
        assert r["stats"]["conv"] > 0 and r["stats"]["kxk_conv"] > 0


def test_cpu_kernels_on_gpu_fail_the_check():
    """kernels='cpu' lowered for a GPU: barriers, and 1x1 / depthwise convolutions as products."""
    accelerators.require_aot_wheels("h100")
    lowered, layers = _lower("h100", "cpu")
    problems = accelerators.kernel_problems(lowered.as_text(debug_info=True), layers)
    assert len(problems) == 2, problems
    assert "optimization_barrier" in problems[0]



def _lower_stage1(target: str):
    devices, _ = accelerators.target_devices(target)
    cfg = accelerators.make_config(tiny=True, step="stage1", kernels="-")
    return accelerators.lower_stage1(cfg, devices, batch=4, size=64, patch=8)


@pytest.mark.parametrize("target", TARGETS)
def test_stage1_clip_step_compiles(target):
    """Stage 1 with CLIP's image encoder (ViT + text tower with context, Eq. 1) compiles for each
    target with default XLA flags. On the H100 this shape failed ("Couldn't find output tile
    sizes" in XLA's Triton GEMM) while attention fed its output projection a transposed operand;
    `clip_text.HeadsDense` contracts the heads without one."""
    accelerators.require_aot_wheels(target)
    lowered, _ = _lower_stage1(target)
    compiled = lowered.compile(DEFAULT_LEVEL)
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert lowered.as_text().count("stablehlo.convolution") >= 1  # the patch embedding


@pytest.mark.parametrize("target", TARGETS)
def test_deit_step_compiles(target):
    """The tiny DeiT MS3 step (configs/pretrain.py:deit,tiny, Tab. 7) in bfloat16 (the paper
    setting's dtype) compiles for each target with default XLA flags and no optimisation
    barrier. In float32 the H100 compile still fails in XLA's Triton GEMM (docs/choices.md,
    "DeiT-B: a multi-level neck for DeepLab-v3+")."""
    accelerators.require_aot_wheels(target)
    devices, _ = accelerators.target_devices(target)
    cfg = accelerators.make_config(tiny=True, step="ms3", kernels="auto", backbone="deit")
    cfg.model.dtype = "bfloat16"
    lowered, _ = accelerators.lower_step(cfg, devices, batch=2, size=32)
    compiled = lowered.compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert accelerators.stray_barriers(lowered.as_text(debug_info=True)) == 0
    assert lowered.as_text().count("stablehlo.convolution") >= 1  # the patch embedding
