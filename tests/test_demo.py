"""configs/demo.py end to end (its 'quick' variant): every stage runs and leaves its outputs."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
from absl import flags

from configs import demo as demo_config
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.demo import job as demo
from ms3_jax.method import text_embeddings
from ms3_jax.testing.paths import ROOT, subprocess_env

flags.FLAGS.mark_as_parsed()
pytestmark = pytest.mark.slow  # the whole demo: the full tier (.ci/run)


def _figures(summary: dict) -> dict:
    """The demo's numbers, without the paths that name its workdir."""
    return {k: v for k, v in summary.items() if k != "backbone"}


def test_demo_quick_runs_every_stage_and_repeats_its_figures(quick_demo, tmp_path):
    """`quick_demo` (conftest: the session's run, shared with tests/test_zero_shot.py) and a
    second run here."""
    workdir, summary = quick_demo
    # Deterministic on one machine: a second run in a new workdir gives the same figures
    # (`summary` was read back from the run's demo_summary.json: compare as JSON).
    again = demo.run(demo_config.get_config("quick"), str(tmp_path / "again"))
    assert _figures(json.loads(json.dumps(again))) == _figures(summary)
    tmp_path = pathlib.Path(workdir)
    ls = LabelSpace.from_datasets(["synth_a", "synth_b", "synth_c"])
    t = text_embeddings.load_text_embeddings(str(tmp_path / "text_adapt" / "text_embeddings.npz"), ls)
    assert t.shape == (ls.num_classes, 32)
    assert (tmp_path / "text_adapt" / "similarity_report.json").exists()
    assert (tmp_path / "pretrain" / "relations.txt").read_text().startswith("multi-label mapping")
    scores = json.loads((tmp_path / "relations_eval.json").read_text())
    assert scores == summary["relations"]
    assert 0.0 <= scores["precision"] <= 1.0 and 0.0 <= scores["recall"] <= 1.0
    assert scores["planted"] > 0 and scores["found"] == len(scores["correct"]) + len(scores["wrong"])
    # The headline counts differently named pairs only; same-name pairs are a sanity count.
    assert all(a.split("/")[1] != b.split("/")[1] for a, b in
               (p.split(" -> ") for p in scores["correct"] + scores["wrong"]))
    assert scores["same_name"]["possible"] > 0
    assert all({"S", "S_self", "status", "kind"} <= set(row) for row in scores["pairs"])
    from safetensors.numpy import load_file
    backbone = load_file(summary["backbone"])
    assert "layer4.0.conv2.weight" in backbone and all(np.isfinite(v).all() for v in backbone.values())
    assert np.isfinite(summary["loss_first"]) and np.isfinite(summary["loss_last"])
    acc = summary["language_accuracy"]
    assert acc["per_class"] and set(acc["per_class"]) <= set(ls.display_names)  # classes seen in val
    assert 0.0 <= acc["pixel_accuracy"] <= 1.0 and 0.0 <= acc["pixel_accuracy_unrelated"] <= 1.0
    # The pretraining datasets by both heads; the held-out synth_d by T of its own names.
    assert set(summary["eval"]) == {"step", "synth_d/language"} | {
        f"{d}/{h}" for d in ("synth_a", "synth_b", "synth_c") for h in ("language", "visual")}
    assert 0.0 <= summary["eval"]["synth_d/language"]["mIoU"] <= 100.0
    per_class = np.array(list(acc["per_class"].values()))
    assert per_class.min() <= acc["pixel_accuracy"] <= per_class.max()  # a pixel-weighted mean


@pytest.mark.parametrize("candidates, planted, found, right",
                         [(256, 10, 51, 4), (256, 10, 14, 4), (16, 3, 2, 0), (20, 5, 20, 5)])
def test_chance_p_is_the_hypergeometric_tail(candidates, planted, found, right):
    want = scipy.stats.hypergeom.sf(right - 1, candidates, planted, found)
    assert demo.chance_p(candidates, planted, found, right) == pytest.approx(want, rel=1e-9)


def test_demo_fails_when_no_better_than_chance():
    demo.check_better_than_chance(0.2, 16, "/w")  # chance 0.0625: fine above 0.125
    with pytest.raises(demo.NoBetterThanChance, match=r"0\.100 < 2 x chance \(1 in 16 names"):
        demo.check_better_than_chance(0.1, 16, "/w")


def test_score_relations_synonyms_either_way_subsets_one_way():
    ls = LabelSpace({"a": ["stairway", "path", "sky"], "b": ["stairs", "dirt track", "sky"]})
    truth = [{"from": "a/stairway", "to": "b/stairs", "kind": "synonym"},
             {"from": "b/stairs", "to": "a/stairway", "kind": "synonym"},
             {"from": "a/sky", "to": "b/sky", "kind": "synonym"},
             {"from": "b/sky", "to": "a/sky", "kind": "synonym"},
             {"from": "b/dirt track", "to": "a/path", "kind": "subset"},
             {"from": "c/x", "to": "a/path", "kind": "subset"}]  # not in the label space
    found = [{"from": "a/path", "to": "b/dirt track"},  # the wrong direction of a subset
             {"from": "a/stairway", "to": "b/stairs"},  # one direction of a synonym
             {"from": "a/sky", "to": "b/sky"}, {"from": "b/sky", "to": "a/sky"}]
    sim = np.arange(36.0).reshape(6, 6) / 100  # S over ls.display_names
    s = demo.score_relations(found, truth, ls, sim)
    # Headline: differently named pairs only; the two same-name pairs are a sanity count.
    assert (s["precision"], s["recall"], s["found"], s["planted"]) == (1 / 2, 1 / 2, 2, 2)
    assert s["same_name"] == {"found": 2, "possible": 2}
    assert s["recall_directed"] == 1 / 3  # of the 3 renamed directed pairs
    assert s["wrong"] == ["a/path -> b/dirt track"] and s["missed"] == ["b/dirt track -> a/path"]
    assert s["correct"] == ["a/stairway -> b/stairs"]
    # 16 differently named cross-dataset pairs, 3 of them planted; 2 found, 1 right.
    assert s["chance_p"] == pytest.approx(scipy.stats.hypergeom.sf(0, 16, 3, 2), rel=1e-12)
    rows = {(r["from"], r["to"]): r for r in s["pairs"]}
    assert set(rows) == {("a/stairway", "b/stairs"), ("b/stairs", "a/stairway"),
                         ("b/dirt track", "a/path"), ("a/path", "b/dirt track")}
    assert rows[("a/path", "b/dirt track")] == {"from": "a/path", "to": "b/dirt track", "kind": "none",
                                                "status": "wrong", "S": 0.1, "S_self": 0.07}
    assert rows[("b/stairs", "a/stairway")]["status"] == "missed"  # the other direction was found
    assert rows[("b/dirt track", "a/path")]["kind"] == "subset"


def test_small_benchmark_learns_relations_are_reported_against_blind_picking(tmp_path_factory):
    """The demo's pretraining at a third of its budget (500 steps, Eq. 6 mask from step 300) on
    the demo's data 2.0, with one random unit T per distinct name (no stage 1): a child process
    on 8 devices at XLA's default level (`ms3_jax.testing.small_benchmark`).

    Asserted: the language head learns (nearest-T accuracy on the classes without a renamed
    relation far above chance, 1 in 16 names); Eq. 6 pairs the same-name classes (one T per
    name: nearly by construction, a sanity check). Reported, as an xfail naming the figures:
    whether Eq. 6's relations between differently named classes beat as many pairs picked
    blindly (hypergeometric tail p < 0.01). Measured at ac50150 and after (2026-12-06,
    `pytest tests/test_demo.py -k small_benchmark`): accuracy 0.703, same-name 10 of 10, 51 pairs
    found with 4 of the 10 planted directed pairs (recall 0.67, precision 0.078), p = 0.115: at
    this budget with random T the paper's rule does not beat blind picking (docs/choices.md,
    "Demo on data 2.0")."""
    root = tmp_path_factory.mktemp("benchmark")
    done = subprocess.run([sys.executable, "-m", "ms3_jax.testing.small_benchmark", str(root)],
                          cwd=ROOT, env=subprocess_env(8, fast_compile=False), capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((root / "benchmark.json").read_text())
    acc, scores = result["accuracy"], result["scores"]
    assert acc["pixel_accuracy_unrelated"] >= 0.5, acc
    assert scores["same_name"]["found"] >= 8, scores
    if scores["chance_p"] >= 0.01:
        pytest.xfail(f"relations do not beat blind picking: {len(scores['correct'])} planted "
                     f"pairs right among {scores['found']} found (precision "
                     f"{scores['precision']:.3f}, recall {scores['recall']:.2f}), chance p = "
                     f"{scores['chance_p']:.3g}; accuracy {acc['pixel_accuracy_unrelated']:.3f}")
