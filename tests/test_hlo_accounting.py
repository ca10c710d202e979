"""The bytes-moved estimate, the breakdown by part and the roofline of benchmarks/accelerators.py
and benchmarks/roofline.py, on hand-written optimised-HLO text (no compile): HBM bytes only
(TPU memory-space assignment's on-chip buffers, S(1) / S(2), move none), async copies counted
once per end in HBM, while loops x trip count, parts from the op_name metadata."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from ms3_jax.testing.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # accelerators.py imports roofline.py
_spec = importlib.util.spec_from_file_location(
    "ms3_benchmarks_accelerators_hlo", os.path.join(ROOT, "benchmarks", "accelerators.py"))
accelerators = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accelerators)
import roofline  # noqa: E402

ENC = 'metadata={op_name="jit(train_step)/transpose(jvp(MS3Encoder))/backbone/layer1_0/conv1/add"}'
MOM = 'metadata={op_name="jit(train_step)/momentum_encoder/MS3Encoder/backbone/layer1_0/bn1/max"}'
HLO = f"""HloModule m

%fused_add (p0: f32[1024], p1: f32[1024]) -> f32[1024] {{
  %p0 = f32[1024]{{0}} parameter(0)
  %p1 = f32[1024]{{0}} parameter(1)
  ROOT %add = f32[1024]{{0}} add(%p0, %p1)
}}

%body (t: (s32[], f32[256])) -> (s32[], f32[256]) {{
  %t = (s32[], f32[256]{{0}}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[256]{{0}} get-tuple-element(%t), index=1
  %y = f32[256]{{0}} negate(%x), {MOM}
  ROOT %r = (s32[], f32[256]{{0}}) tuple(%i, %y)
}}

%cond (t: (s32[], f32[256])) -> pred[] {{
  %t = (s32[], f32[256]{{0}}) parameter(0)
  ROOT %c = pred[] constant(true)
}}

ENTRY %main (a: f32[1024], b: f32[1024], img: u8[16,8]) -> f32[1024] {{
  %a = f32[1024]{{0}} parameter(0)
  %b = f32[1024]{{0}} parameter(1)
  %img = u8[16,8]{{1,0}} parameter(2)
  %cs = (f32[1024]{{0:T(1024)S(1)}}, f32[1024]{{0:T(1024)}}, u32[]{{:S(2)}}) copy-start(%a)
  %cd = f32[1024]{{0:T(1024)S(1)}} copy-done(%cs)
  %ss = ((u8[16,8]{{1,0}}), u8[4,8]{{1,0:S(1)}}, s32[]{{:S(2)}}) slice-start(%img), slice={{[0:4], [0:8]}}
  %sd = u8[4,8]{{1,0:S(1)}} slice-done(%ss)
  %f = f32[1024]{{0}} fusion(%cd, %b), kind=kLoop, calls=%fused_add, {ENC}
  %g = f32[1024]{{0:S(1)}} fusion(%f, %b), kind=kLoop, calls=%fused_add
  %w0 = (s32[], f32[256]{{0}}) tuple(%c0, %z)
  %w = (s32[], f32[256]{{0}}) while(%w0), condition=%cond, body=%body, backend_config={{"known_trip_count":{{"n":"3"}}}}
  ROOT %out = f32[1024]{{0}} copy(%g)
}}
"""


def test_hbm_bytes_skip_on_chip_buffers_and_count_async_copies_once():
    comps, entry = accelerators.parse_hlo(HLO)
    moved = {ins.name: b * times for ins, times, b in accelerators.kernels(comps, entry, [])}
    assert moved["cs"] == 4096  # HBM -> VMEM prefetch: one HBM read
    assert moved["ss"] == 4 * 8  # the slice, read once from HBM
    assert moved["f"] == 4096 + 4096  # operand %cd is in VMEM: b read + output written
    assert moved["g"] == 4096 + 4096  # f and b read; the output stays on chip
    assert moved["out"] == 0 + 4096  # reads %g from VMEM
    assert moved["y"] == 3 * (1024 + 1024)  # the while body x its known trip count
    assert accelerators.bytes_moved(comps, entry, []) == sum(moved.values())
    assert accelerators.shape_bytes("f32[1024]{0:T(1024)S(1)}", hbm_only=False) == 4096


def test_breakdown_parts_from_the_op_names():
    bd = accelerators.breakdown(HLO)
    assert bd["total"] == accelerators.hlo_stats(HLO)["moved"]
    assert bd["parts"]["backbone bwd"] == 8192
    assert bd["parts"]["momentum encoder"] == 3 * 2048
    assert sum(bd["parts"].values()) == bd["total"]
    assert bd["kernels"][0]["part"] == "backbone bwd" and bd["kernels"][0]["kind"] == "fusion:kLoop(elementwise)"
    part = accelerators.part_of
    assert part("jit(train_step)/jvp(MS3Encoder)/decode_head/aspp_modules_1/conv/conv") == "decoder fwd"
    assert part("jit(train_step)/transpose(jvp(MS3Encoder))/proj_visual/conv_0/x") == "heads bwd"
    assert part("jit(train_step)/transpose(jvp(losses))/while/body/dot") == "losses bwd"
    assert part("jit(train_step)/optimizer/add") == "optimizer + EMA"
    assert part("jit(train_step)/memory/reduce_sum") == "bank + relations (Eq. 4-6)"
    assert part("state.params['backbone']") == "state (copies)" and part("") == "unnamed (copies, prefetches)"
    assert part("jit(step)/transpose(jvp(CLIPTextTower))/encoder/layers_0/mlp") == "text tower bwd"


def test_roofline_estimate_and_paper_hours():
    est = roofline.estimate(flops=197e9, bytes_moved=1638e6, chip="v5e", images=16)
    assert est.flop_s == pytest.approx(1e-3) and est.byte_s == pytest.approx(2e-3)
    assert est.step_s == pytest.approx(2e-3) and est.over_floor == pytest.approx(2.0)
    assert est.images_per_s == pytest.approx(8000)
    # 100 epochs of 149,079 images on 8 chips at 8000 images/s per chip
    assert est.run_hours() == pytest.approx(100 * 149_079 / 64_000 / 3600)
    assert roofline.chip_of("TPU v5 lite") == "v5e" and roofline.chip_of("NVIDIA H100 80GB HBM3") == "h100"
    assert roofline.chip_of("TPU v5p") == "v5p" and roofline.chip_of("cpu") is None
