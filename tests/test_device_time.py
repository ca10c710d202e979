"""benchmarks/device_time.py on CPU: the tiny ms3 / ce / stage-1 steps compiled, run and timed
in-process (one of the 8 simulated devices), the table and the JSON it writes."""
import importlib.util
import json
import os
import statistics

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "ms3_benchmarks_device_time", os.path.join(ROOT, "benchmarks", "device_time.py"))
device_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_time)

BATCH, WARMUP, TIMED = 2, 1, 2


@pytest.mark.slow
def test_times_all_three_steps_on_cpu(tmp_path, capsys):
    out = tmp_path / "device_time.json"
    argv = ["--batch", str(BATCH), "--stage1-batch", str(BATCH), "--size", "32",
            "--warmup", str(WARMUP), "--timed", str(TIMED), "--json", str(out)]
    result = device_time.main(argv)
    printed = capsys.readouterr().out

    rows = {r["step"]: r for r in result["rows"]}
    assert list(rows) == ["ms3", "ce", "stage1"]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["devices"] == 1 and r["batch_per_chip"] == BATCH
        assert r["compile_s"] > 0 and r["ms_per_step"] > 0
        assert len(r["step_times_ms"]) == TIMED and r["ms_per_step"] == statistics.median(r["step_times_ms"])
        assert r["images_per_s_per_chip"] == pytest.approx(BATCH / (r["ms_per_step"] / 1e3))
        # The steps ran on the state they returned: counter advanced once per step, weights moved.
        assert r["state_step_before"] == 0 and r["state_step_after"] == WARMUP + TIMED
        assert r["params_changed"] and r["all_finite"]
        assert r["flops"] > 0 and r["bytes_moved"] > 0
        assert r["chip"] is None and r["roofline_ms"] is None and r["ratio"] is None  # CPU

    table = [l for l in printed.splitlines() if l.startswith("| ")]
    assert table[0] == "| " + " | ".join(device_time.COLUMNS) + " |"
    for line, step in zip(table[1:], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == step and cells[-2:] == ["-", "-"]
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[3]) > 0
    assert f"paste into benchmarks/RESULTS.md with this table: `python benchmarks/device_time.py {argv[0]}" in printed
    assert "tiny models" in printed and f"jax {jax.__version__}" in printed

    written = json.loads(out.read_text())
    assert written["header"]["device_kind"] == jax.devices()[0].device_kind
    assert written["header"]["platform"] == "cpu" and written["header"]["devices"] == 1
    assert written["header"]["jax"] == jax.__version__ and written["header"]["model"] == "tiny"
    assert [r["step"] for r in written["rows"]] == ["ms3", "ce", "stage1"]
    assert written["rows"][0]["ms_per_step"] == rows["ms3"]["ms_per_step"]


def test_flops_fall_back_to_the_unoptimised_hlo_and_ratio_cells():
    """GPU executables have no cost_analysis: FLOPs come from the lowered HLO, per device."""
    x = jnp.ones((64, 64), jnp.float32)
    lowered = jax.jit(lambda a: a @ a).lower(x)

    class NoCost:
        def cost_analysis(self):
            return None

    flops, source = device_time.step_flops(NoCost(), lowered, 2)
    assert source == "unoptimised HLO" and flops == pytest.approx(2 * 64 ** 3 / 2, rel=0.05)
    flops, source = device_time.step_flops(lowered.compile(), lowered, 1)
    assert source == "cost_analysis" and flops == pytest.approx(2 * 64 ** 3, rel=0.05)
    row = {"step": "ms3", "status": "ok", "compile_s": 61.2, "ms_per_step": 250.0,
           "images_per_s_per_chip": 64.0, "roofline_ms": 100.0, "ratio": 2.5}
    assert device_time.table_row(row) == "| ms3 | 61.2 | 250.0 | 64.0 | 100 | 2.50 |"
    assert device_time.table_row({"step": "ce", "status": "XlaRuntimeError: RESOURCE_EXHAUSTED"}) == \
        "| ce | XlaRuntimeError: RESOURCE_EXHAUSTED | - | - | - | - |"
