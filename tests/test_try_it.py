"""README's "Try it" path on the tiny settings, on the session's quick demo (conftest): the
demo's sample images (`demo.write_samples`), configs/finetune/synthetic.py from the demo's
backbone (`:ms3,tiny`; `:scratch` differs by its config string), then `predict` on the samples folder
and `zero_shot` on a held-out sample. In-process (the commands' `main`s and the stage the
`ms3_jax.main` command runs), so the steps compile once per session."""
import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
from absl import flags
from PIL import Image

from ms3_jax import predict, zero_shot
from ms3_jax.data import synthetic
from ms3_jax.demo import job as demo
from ms3_jax.engine import config_paths
from ms3_jax.files import safe
from ms3_jax.stages import finetune
from ms3_jax.testing.configs import with_overrides

flags.FLAGS.mark_as_parsed()

CONFIG = "configs/finetune/synthetic.py"


def load_config(arg: str):
    """configs/finetune/synthetic.py:`arg`, loaded by path as `python -m ms3_jax.main` does."""
    path = config_paths.find_config(CONFIG)
    spec = importlib.util.spec_from_file_location("_ms3_configs_finetune_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_synthetic_finetune_config_fits_the_demo_and_evaluates_a_few_times():
    from configs import demo as demo_config
    assert CONFIG in config_paths.available()  # `--config=configs/finetune/synthetic.py:ms3`
    shown = demo_config.get_config()
    model = lambda m: (m.width, tuple(m.stage_sizes), m.depth, m.variant)  # noqa: E731
    for arg, kind in (("ms3", "ms3"), ("scratch", "scratch"), ("ms3,tiny", "ms3"),
                      ("tiny,scratch", "scratch")):
        c = load_config(arg)
        assert (c.init.kind, c.data.dataset) == (kind, synthetic.HELD_OUT_DATASET)
        assert model(c.model) == model(shown.pretrain.model)  # the demo's backbone loads
        assert c.data.data_dir.startswith(safe.user_cache_dir("data"))
    c = load_config("ms3")
    assert c.data.synthetic == {**shown.synthetic, "num_val": c.data.synthetic["num_val"]}
    assert (c.batch_size, c.data.crop_size) == (shown.pretrain.batch_size,
                                                shown.pretrain.data.crop_size)
    assert (c.num_steps, c.eval_every, c.checkpoint_every) == (300, 100, 100)
    c.num_steps = 1000  # what --config.num_steps=1000 does: a third of the steps each
    assert (c.eval_every, c.checkpoint_every) == (334, 334)
    assert json.loads(c.to_json())["eval_every"] == 334  # config.json, the resume guard
    c.eval_every = 50
    assert (c.eval_every, c.checkpoint_every) == (50, 334)
    c.num_steps = 2
    assert c.checkpoint_every == 1
    c.init.path = "runs/demo/pretrain"
    finetune.check_config(c, 1)
    assert load_config("scratch,frozen").frozen_backbone
    with pytest.raises(ValueError, match=r"unknown config string.*'tab7'.*valid: ms3, scratch"):
        load_config("ms3,tab7")


@pytest.mark.slow  # two fine-tunings
def test_try_it_finetune_then_predict_and_zero_shot_on_the_samples(quick_demo, tmp_path, caplog):
    demo_dir, _ = quick_demo
    samples = os.path.join(demo_dir, demo.SAMPLES_DIR)
    meta = json.loads(open(os.path.join(samples, demo.SAMPLES_FILE)).read())
    images = meta["images"]
    files = sorted(f for f in os.listdir(samples) if f.endswith(".png"))
    assert files == sorted(e["file"] for e in images) and len(files) == 6
    assert [e["dataset"] for e in images] == ["synth_d"] * 3 + list(synthetic.PRETRAIN_DATASETS)
    assert [e["held_out"] for e in images] == [True] * 3 + [False] * 3
    for e in images:
        assert set(e["shown"]) <= set(e["classes"]) | {demo.NOT_ANNOTATED}
        assert sum(e["shown"].values()) == pytest.approx(1.0, abs=0.01)
        assert os.path.isfile(os.path.join(demo_dir, e["truth"]))
    # The validation records themselves, losslessly.
    for e in images[2:4]:
        with Image.open(os.path.join(samples, e["file"])) as im:
            np.testing.assert_array_equal(
                np.asarray(im), zero_shot.synthetic_sample(demo_dir, e["dataset"], e["index"]))
    readme = open(os.path.join(samples, demo.SAMPLES_README)).read()
    assert "python -m ms3_jax.zero_shot" in readme and "python -m ms3_jax.predict" in readme
    # A demo workdir from before samples existed (its data only) gets the same files.
    old = tmp_path / "old_demo"
    shutil.copytree(os.path.join(demo_dir, "data"), old / "data")
    assert len(demo.write_samples(str(old))) == len(files)
    for f in files + [demo.SAMPLES_FILE]:
        got, want = (old / demo.SAMPLES_DIR / f).read_bytes(), open(os.path.join(samples, f), "rb").read()
        assert got == want.replace(demo_dir.encode(), str(old).encode()), f

    # Fine-tune on synth_d from the demo's backbone (`python -m ms3_jax.main
    # --config=configs/finetune/synthetic.py:ms3,tiny --config.init.path=W/pretrain ...`), with
    # the steps of the tests' other tiny fine-tunings (`tiny_finetune_config`: the same programs).
    # The ':scratch' command differs by its config string alone (checked above: the config) and
    # trains as tests/test_finetune.py's scratch fine-tuning does.
    workdirs = {}
    for arg in ("ms3,tiny",):
        c = with_overrides(load_config(arg), **{
            "num_steps": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1,
            "eval.max_images": 2, "data.synthetic": None,
            "data.data_dir": os.path.join(demo_dir, "data")})  # the demo's data, read only
        if arg.startswith("ms3"):
            c.init.path = os.path.join(demo_dir, "pretrain")
        workdirs[arg] = str(tmp_path / arg.split(",")[0])
        caplog.clear()
        with caplog.at_level("INFO"):
            results = finetune.train_and_evaluate(c, workdirs[arg])
        assert results["dataset"] == "synth_d" and results["init"]["kind"] == arg.split(",")[0]
        assert [e["step"] for e in results["evaluations"]] == [2]
        assert 0.0 <= results["mIoU"] <= 100.0
        # The one line that compares two runs, naming the initialisation.
        assert any(re.fullmatch(rf"synth_d: mIoU {results['mIoU']:.2f} \(.*initialised: ms3 from .*pretrain\) -> .*results\.json",
                                r.getMessage()) for r in caplog.records)

    out = tmp_path / "out"
    written = predict.main(["--workdir", workdirs["ms3,tiny"], "--image", samples + "/",
                            "--out", str(out / "predict")])
    assert sorted(os.path.basename(p) for p, _ in written) == sorted(
        f.replace(".png", "_labels.png") for f in files)
    held = images[0]
    written = zero_shot.main(["--workdir", demo_dir, "--image", os.path.join(samples, held["file"]),
                              "--classes", ",".join(held["classes"]), "--short_side", "0",
                              "--out", str(out / "zero_shot")])
    with Image.open(written[0][0]) as im:
        assert np.asarray(im).max() < len(held["classes"])
