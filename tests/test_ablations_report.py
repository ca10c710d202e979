"""benchmarks/ablations.py's report: paired differences with t-intervals, and the quote check."""
import importlib.util
import os

import numpy as np
import pytest

from ms3_jax.testing.paths import ROOT

_spec = importlib.util.spec_from_file_location(
    "ms3_benchmarks_ablations", os.path.join(ROOT, "benchmarks", "ablations.py"))
ablations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablations)

T_975 = {4: 2.7764451051977987}  # Student t, 97.5 % quantile, 4 degrees of freedom


def _results(offset):
    rng = np.random.default_rng(0)
    base = rng.uniform(60, 80, 5)
    noise = rng.normal(0, 1, 5)
    return ([{"row": "ce_single", "seed": s, "miou_finetune": float(base[s]),
              "miou_frozen": float(base[s])} for s in range(5)] +
            [{"row": "ce_multi", "seed": s, "miou_finetune": float(base[s] + offset + noise[s]),
              "miou_frozen": float(base[s] - offset + noise[s])} for s in range(5)]), noise


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_paired_difference_and_interval_match_a_hand_computation(offset):
    results, noise = _results(offset)
    d = offset + noise  # the paired differences, seed by seed (the shared base cancels)
    half = T_975[4] * d.std(ddof=1) / np.sqrt(5)
    got = ablations.paired(results, "ce_multi", "ce_single", "miou_finetune")
    assert got["n"] == 5
    np.testing.assert_allclose([got["mean"], got["low"], got["high"]],
                               [d.mean(), d.mean() - half, d.mean() + half], atol=0.006)
    want = "holds" if d.mean() - half > 0 else "reversed" if d.mean() + half < 0 else "not resolved"
    assert got["verdict"] == want
    frozen = ablations.paired(results, "ce_multi", "ce_single", "miou_frozen")
    if offset:
        assert got["verdict"] == "holds" and frozen["verdict"] == "reversed"
    # Unpaired seeds are left out; fewer than two pairs: no interval.
    one = [r for r in results if r["row"] == "ce_single" or r["seed"] == 0]
    assert ablations.paired(one, "ce_multi", "ce_single", "miou_finetune")["verdict"] == "too few seeds"


def test_report_and_quote_check(tmp_path):
    results, _ = _results(3.0)
    table = ablations.report(ablations.summarize(results))
    assert "| CE multi-head > CE single-head |" in table
    row = next(line for line in table.splitlines() if line.startswith("| CE single-head |"))
    doc = tmp_path / "doc.md"
    doc.write_text(f"| CE single-head | 9 | old |\n{ablations.QUOTE_BEGIN}\n{row}\n{ablations.QUOTE_END}\n")
    assert ablations.check_quotes(str(doc), table) == []  # the stale line outside is not read
    doc.write_text(f"{ablations.QUOTE_BEGIN}\n{row.replace('5', '4', 1)}\n{ablations.QUOTE_END}\n")
    assert len(ablations.check_quotes(str(doc), table)) == 1
    doc.write_text(f"{ablations.QUOTE_BEGIN}\n{ablations.QUOTE_END}\n")
    assert ablations.check_quotes(str(doc), table) == ["quotes no row of the run"]
