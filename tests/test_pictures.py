"""What a user opens: the TensorBoard example panels (captioned, enlarged, with a legend), the
relations report's header, and the notebook's one repository URL. Cheap: small arrays, no model
compile (the panels of a real run: tests/test_pretrain.py; the notebook run: test_zero_shot.py)."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import types

import nbformat
import numpy as np
import pytest

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.evaluation import pretrain_eval, visualize
from ms3_jax.method import relations
from ms3_jax.testing.paths import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "zero_shot.ipynb")


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _find(panel, tile):
    """(y, x) of the one place where `tile` sits in `panel` (exact pixels)."""
    th, tw = tile.shape[:2]
    ys, xs = np.nonzero(np.all(panel[:panel.shape[0] - th + 1, :panel.shape[1] - tw + 1]
                               == tile[0, 0], axis=-1))
    hits = [(y, x) for y, x in zip(ys, xs) if np.array_equal(panel[y:y + th, x:x + tw], tile)]
    assert len(hits) == 1, hits
    return hits[0]


def _has_box(region, colour, size=10):
    """Whether `region` holds a `size` x `size` square of exactly `colour` (a legend box)."""
    mask = np.all(region == np.asarray(colour, np.uint8), axis=-1)
    if min(mask.shape) < size:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(mask, (size, size))
    return bool(windows.all(axis=(-2, -1)).any())


def _has_text(region):
    return bool((region.max(-1) < 100).sum() > 10)  # dark glyph pixels on the white background


@pytest.mark.parametrize("h,w,factor", [(48, 72, 6), (96, 128, 3), (300, 400, 1)])
def test_panel_is_image_truth_prediction_enlarged_and_captioned(h, w, factor):
    image = _image(h, w)
    names = ["sky", "grass", "stairway"]
    truth = np.zeros((h, w), np.int32)
    truth[h // 2:] = 1
    truth[:4, :4] = -1  # ignored
    pred = np.full((h, w), 2, np.int32)
    panel = visualize.panel(image, [("ground truth", truth), ("prediction", pred)], names,
                            title="synth_a / language head")
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[-1] == 3
    assert visualize.upscale_factor(h) == factor and h * factor >= visualize.PANEL_MIN_HEIGHT
    assert panel.shape[0] >= h * factor
    # The three tiles, in this order, each enlarged by the same factor without smoothing.
    tiles = [visualize.upscale(image, factor)] + [
        visualize.upscale(visualize.blend(image, y, len(names)), factor) for y in (truth, pred)]
    where = [_find(panel, t) for t in tiles]
    assert len({y for y, _ in where}) == 1 and where[0][1] < where[1][1] < where[2][1]
    top = where[0][0]
    # A caption over each tile and a title above the captions.
    for _, x in where:
        assert _has_text(panel[top - 24:top, x:x + w * factor])
    assert _has_text(panel[:top - 24])
    untitled = visualize.panel(image, [("ground truth", truth), ("prediction", pred)], names)
    assert untitled.shape[0] < panel.shape[0] and _find(untitled, tiles[0])[0] < top
    # One legend right of the tiles: a colour box per class (at least 14 px: readable text), and
    # the ignored colour since the ground truth has ignored pixels.
    legend = panel[:, where[2][1] + w * factor:]
    for colour in [*visualize.palette(3), visualize.IGNORED_COLOUR]:
        assert _has_box(legend, colour, 12), colour
    assert _has_text(legend)


def test_panel_legend_lists_the_classes_present_when_there_are_many():
    image = _image(40, 40)
    names = [f"class {i}" for i in range(40)]
    truth, pred = np.full((40, 40), 3), np.full((40, 40), 7)
    panel = visualize.panel(image, [("ground truth", truth), ("prediction", pred)], names)
    legend = panel[:, 3 * 40 * visualize.upscale_factor(40):]
    colours = visualize.palette(40)
    present = [_has_box(legend, c) for c in colours]
    assert present[3] and present[7] and sum(present) == 2
    assert not _has_box(legend, visualize.IGNORED_COLOUR)  # nothing ignored
    small = visualize.panel(image, [("prediction", pred)], names[:5], min_height=0,
                            ignored_name="(not named)")
    _find(small, image)  # min_height 0: the image at its own size
    assert all(_has_box(small, c) for c in colours[:5])  # few classes: all listed


def test_blend_and_upscale():
    image = _image(3, 2)
    labels = np.array([[0, 1], [5, -1], [1, 0]])
    out = visualize.blend(image, labels, 2, alpha=0.5)
    colours = visualize.palette(2).astype(float)
    np.testing.assert_allclose(out[0, 1], np.round(0.5 * image[0, 1] + 0.5 * colours[1]), atol=1)
    ignored = np.round(0.5 * image[1, 0] + 0.5 * np.array(visualize.IGNORED_COLOUR))
    np.testing.assert_allclose(out[1, 0], ignored, atol=1)  # out of range: ignored
    np.testing.assert_allclose(out[1, 1], np.round(0.5 * image[1, 1] + 0.5 * np.array(
        visualize.IGNORED_COLOUR)), atol=1)  # negative: ignored
    big = visualize.upscale(out, 4)
    assert big.shape == (12, 8, 3)
    assert np.array_equal(big[4:8, 0:4], np.broadcast_to(out[1, 0], (4, 4, 3)))
    assert visualize.upscale(out, 1) is out and visualize.upscale_factor(300) == 1
    with pytest.raises(ValueError, match="do not match"):
        visualize.blend(image, labels[:2], 2)


def test_example_panels_name_dataset_and_head(monkeypatch):
    """`pretrain_eval.example_panels` with the data and the prediction faked (no model, no
    compile): one captioned panel per dataset and head, at least PANEL_MIN_HEIGHT tall."""
    ls = LabelSpace.from_datasets(["synth_a", "synth_b"])
    image = _image(48, 72)
    label = np.zeros((48, 72), np.int32)
    label[:, :10] = -1
    monkeypatch.setattr(pretrain_eval.eval_data, "make_eval_dataset",
                        lambda name, **kw: [{"image": image, "label": label}])
    predicted = {}

    def fake_predict(apply_fn, num_classes):
        def run(variables, images):
            predicted[num_classes] = images.shape
            scores = np.zeros((1, 48, 72, num_classes), np.float32)
            scores[..., num_classes - 1] = 1.0
            return scores
        return run

    monkeypatch.setattr(pretrain_eval, "_predict", fake_predict)
    emb = np.ones((ls.num_classes, 4), np.float32)
    panels = pretrain_eval.example_panels(object(), {}, {"language": emb, "visual": emb}, ls, None)
    assert set(panels) == {f"{d}/{h}" for d in ("synth_a", "synth_b")
                           for h in ("language", "visual")}
    for key, panel in panels.items():
        assert panel.dtype == np.uint8 and panel.shape[0] >= visualize.PANEL_MIN_HEIGHT, key
        assert panel.shape[1] >= 3 * 72 * visualize.upscale_factor(48), key
    # The title names the dataset and the head: it differs between heads of one dataset.
    a, b = panels["synth_a/language"], panels["synth_a/visual"]
    assert a.shape == b.shape and not np.array_equal(a[:20], b[:20])
    assert np.array_equal(a[40:], b[40:])  # same image, truth and (faked) prediction
    assert predicted == {7: (1, 48, 72, 3)}


# --- relations.txt --------------------------------------------------------------------------

_ROW = re.compile(r"^(.+) \[(.+)\] \(self (-?\d\.\d{3})\) -> (.+ \[.+\] -?\d\.\d{3})$")


def _report_inputs():
    names = ["dirt track", "car", "path", "bus"]
    ds_names = ["ade20k", "ade20k", "coco_stuff", "coco_stuff"]
    s = np.array([[0.40, 0.10, 0.45, 0.05], [0.05, 0.50, 0.10, 0.30],
                  [0.30, 0.05, 0.60, 0.05], [0.00, 0.48, 0.10, 0.45]], np.float32)
    m = np.zeros((4, 4), bool)
    m[0, 2] = m[3, 1] = True
    return m, s, names, ds_names


def test_relations_report_header_explains_columns_and_scores():
    report = relations.relations_report(*_report_inputs())
    lines = report.splitlines()
    assert lines[0] == "multi-label mapping: 2 directed pairs from 2 classes"  # the console line
    header = [line for line in lines[1:] if line.startswith("#")]
    assert header == list(relations.REPORT_LEGEND)
    assert lines[1:1 + len(header)] == header  # the header first, then the rows
    text = "\n".join(header)
    for words in ("(self 0.215)", "S[y, y]", "Eq. 5", "Eq. 6", "S[y, y'] >= S[y, y]", "Directed",
                  "Tab. 8", "relations.json", "highest first"):
        assert words in text, words
    rows = lines[1 + len(header):]
    assert rows == ["dirt track [ade20k] (self 0.400) -> path [coco_stuff] 0.450",
                    "bus [coco_stuff] (self 0.450) -> car [ade20k] 0.480"]
    assert all(_ROW.match(r) for r in rows)
    assert max(map(len, header)) <= 100
    with_k = relations.relations_report(*_report_inputs(), top_k=2).splitlines()
    assert ("# relations.top_k=2: of each line only the 2 highest S[y, y'] are kept (not in the "
            "paper).") in with_k
    empty = relations.relations_report(np.zeros((4, 4), bool), *_report_inputs()[1:]).splitlines()
    assert empty[0] == "multi-label mapping: 0 directed pairs from 0 classes" and all(
        line.startswith("#") for line in empty[1:])


def test_write_relations_report_writes_the_header(tmp_path):
    from ms3_jax.stages import pretrain
    ls = LabelSpace.from_datasets(["synth_a", "synth_b"])
    k = ls.num_classes
    sim = np.full((k, k), 0.1, np.float32)
    np.fill_diagonal(sim, 0.3)
    a, b = ls.union_id("synth_a/stairway"), ls.union_id("synth_b/stairs")
    sim[a, b] = 0.35
    state = types.SimpleNamespace(sim=sim, sim_seen=np.ones(k, bool))
    report = pretrain.write_relations_report(str(tmp_path), state, ls, ls.other_dataset_mask(), 0)
    text = (tmp_path / "relations.txt").read_text()
    assert text == report + "\n" and text.startswith("multi-label mapping: 1 directed pairs")
    assert "\n".join(relations.REPORT_LEGEND) in text
    assert text.splitlines()[-1] == "stairway [synth_a] (self 0.300) -> stairs [synth_b] 0.350"
    pairs = json.loads((tmp_path / "relations.json").read_text())
    assert pairs == [{"from": "synth_a/stairway", "to": "synth_b/stairs",
                      "similarity": pytest.approx(0.35), "self_similarity": pytest.approx(0.3)}]


# --- the notebook ---------------------------------------------------------------------------

def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_names_the_repository_in_one_place():
    nb = _notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") for c in code), "commit the notebook with outputs cleared"
    first = code[0].source
    assert len(re.findall(r"^REPO_URL = ", first, re.M)) == 1
    assert "SET ME" in first.split("REPO_URL = ", 1)[1].splitlines()[0]  # marked for the user
    for cell in nb.cells:
        assert "<owner>" not in cell.source
        if cell is not code[0]:
            assert "REPO_URL =" not in cell.source and "github.com" not in cell.source
    # The stated time is a measured one, and tests can shorten the demo.
    intro = nb.cells[0].source
    assert re.search(r"about \d+ minutes on a 2-core CPU", intro), intro
    assert "MS3_NOTEBOOK_DEMO" in intro and any("MS3_NOTEBOOK_DEMO" in c.source for c in code)


def _run_setup_cell(monkeypatch, cwd, repo_url="", installed=True):
    """Executes the notebook's first code cell in `cwd` (REPO_URL set to `repo_url`); returns
    (its namespace, the commands it ran). No command runs for real."""
    source = next(c for c in _notebook().cells if c.cell_type == "code").source
    source = re.sub(r"^REPO_URL = .*$", f"REPO_URL = {repo_url!r}", source, count=1, flags=re.M)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", list(sys.path))
    ran = []

    def fake_run(cmd, check=False):
        ran.append(list(cmd))
        if cmd[:2] == ["git", "clone"]:  # a checkout appears where the clone goes
            for f in ("pyproject.toml", "ms3_jax/__init__.py", "configs/demo.py"):
                os.makedirs(os.path.join(cmd[-1], os.path.dirname(f)), exist_ok=True)
                open(os.path.join(cmd[-1], f), "w").close()

    monkeypatch.setattr(subprocess, "run", fake_run)
    if not installed:
        def missing(name):
            raise importlib.metadata.PackageNotFoundError(name)
        monkeypatch.setattr(importlib.metadata, "distribution", missing)
    namespace = {}
    exec(compile(source, "setup-cell", "exec"), namespace)
    return namespace, ran


def test_notebook_uses_a_local_checkout_and_clones_only_without_one(monkeypatch, tmp_path):
    # Inside the checkout (Jupyter started in notebooks/): nothing cloned, nothing installed.
    ns, ran = _run_setup_cell(monkeypatch, os.path.join(ROOT, "notebooks"))
    assert ran == [] and ns["checkout"] == os.path.realpath(ROOT)
    # Installed, outside any checkout (the headless test): nothing to do either.
    ns, ran = _run_setup_cell(monkeypatch, tmp_path)
    assert ran == [] and ns["checkout"] is None
    # A checkout, not installed: installed from it, not cloned.
    ns, ran = _run_setup_cell(monkeypatch, os.path.join(ROOT, "notebooks"), installed=False)
    assert ran == [[sys.executable, "-m", "pip", "install", "-q", "-e", os.path.realpath(ROOT)]]
    # Nothing at all (a fresh Colab): REPO_URL must be set ...
    with pytest.raises(RuntimeError, match="set REPO_URL in this cell"):
        _run_setup_cell(monkeypatch, tmp_path, installed=False)
    # ... and is the one URL cloned.
    url = "https://example.org/me/ms3_jax.git"
    ns, ran = _run_setup_cell(monkeypatch, tmp_path, repo_url=url, installed=False)
    clone = str(tmp_path / "ms3_jax")
    assert ran == [["git", "clone", "-q", url, "ms3_jax"],
                   [sys.executable, "-m", "pip", "install", "-q", "-e", ns["checkout"]]]
    assert os.path.realpath(ns["checkout"]) == os.path.realpath(clone)
    assert sys.path[0] == ns["checkout"]
