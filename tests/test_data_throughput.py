"""benchmarks/data_throughput.py on a tiny real-format dataset: the generated COCO-Stuff / ADE20K
files built by the project's builders, read by the training pipeline (in this process,
worker_count=0), and the host-sizing arithmetic."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ms3_jax.data import pipeline, registry
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.testing.paths import ROOT

_spec = importlib.util.spec_from_file_location(
    "ms3_benchmarks_data_throughput", os.path.join(ROOT, "benchmarks", "data_throughput.py"))
data_throughput = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = data_throughput  # its dataclasses look their module up
_spec.loader.exec_module(data_throughput)

COCO_SIZES = ((64, 48, 1.0), (48, 64, 1.0))
ADE_SIZES = ((68, 51, 1.0), (51, 51, 1.0))
SPEC = data_throughput.RawSpec(num_train=3, num_val=1, coco_sizes=COCO_SIZES, ade_sizes=ADE_SIZES)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data_throughput.build(str(tmp_path_factory.mktemp("real_format")), SPEC)


def test_cache_key_follows_the_spec():
    assert SPEC.key() == data_throughput.RawSpec(3, 1, COCO_SIZES, ADE_SIZES).key()
    assert SPEC.key() != data_throughput.RawSpec(4, 1, COCO_SIZES, ADE_SIZES).key()
    assert SPEC.key() != data_throughput.RawSpec(3, 1, COCO_SIZES, ADE_SIZES[:1]).key()
    assert data_throughput.default_data_dir(SPEC).endswith(os.path.join("real_format_bench", SPEC.key()))


def test_raw_files_in_the_official_layouts(tmp_path):
    written = data_throughput.write_raw(str(tmp_path), SPEC)
    coco = tmp_path / "coco"
    assert sorted(p.name for p in (coco / "images/train2017").iterdir()) == [
        "000000000001.jpg", "000000000002.jpg", "000000000003.jpg"]
    assert len(list((coco / "stuffthingmaps_trainval2017/val2017").glob("*.png"))) == 1
    ade = tmp_path / "ade/ADEChallengeData2016"
    assert (ade / "images/training/ADE_train_00000003.jpg").is_file()
    assert (ade / "annotations/validation/ADE_val_00000001.png").is_file()
    for dataset, files in written.items():
        sizes = {(w, h) for w, h, _ in (COCO_SIZES if dataset == "coco_stuff" else ADE_SIZES)}
        for path, w, h in files:
            with Image.open(path) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (w, h))
            assert (w, h) in sizes
            with Image.open(path.replace("/images/", "/stuffthingmaps_trainval2017/" if dataset ==
                                         "coco_stuff" else "/annotations/")[:-4] + ".png") as lab:
                raw = np.asarray(lab)
            assert lab.format == "PNG" and raw.shape == (h, w)
            valid = registry.get(dataset).builder.VALID_RAW
            assert valid[np.unique(raw)].all()  # raw ids the builder accepts
            assert len(np.unique(raw)) >= 3  # stuff bands and things


def test_built_records_are_the_generated_jpeg_png(data_dir):
    stats = data_throughput.encoded_stats(data_throughput.DATASETS, data_dir)
    for dataset, sizes in (("coco_stuff", COCO_SIZES), ("ade20k", ADE_SIZES)):
        s = stats[dataset]
        assert s["records"] == 3 and s["formats"] == [("JPEG", "PNG")]
        assert set(s["sizes"]) <= {(w, h) for w, h, _ in sizes}
        assert s["mean_pixels"] == np.mean([w * h for w, h in s["sizes"]])
        assert s["mean_jpeg_bytes"] > 1000
        # labels as built: the dataset's train ids (the builder's LUT), 255 = ignore
        src = tfds.data_source(registry.get(dataset).builder.name, split="train", data_dir=data_dir)
        n = len(registry.get(dataset).classes)
        for i in range(len(src)):
            ids = np.unique(src[i]["label"])
            assert ((ids < n) | (ids == 255)).all() and (ids < n).any()
    assert data_throughput.build(data_dir, SPEC) == data_dir  # cached: no rebuild


def test_pipeline_batches(data_dir):
    ls = LabelSpace.from_datasets(data_throughput.DATASETS)
    pipe = data_throughput.make_pipeline(
        data_throughput.DATASETS, data_dir, batch_size=4, crop_size=32,
        loader=pipeline.LoaderOptions(worker_count=0, num_threads=1))
    assert np.isclose(pipe.weights[1] / pipe.weights[0], 118287 / 20210)  # the official mix
    it = pipe.make_iterator()
    try:
        batch = next(it)
        r = data_throughput.measure(it, num_batches=2, warmup=0)
    finally:
        it.close()
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4, 32, 32) and batch["label"].dtype == np.int32
    for d, label in zip(batch["dataset_id"], batch["label"]):
        lo, hi = ls.offsets[d], ls.offsets[d + 1]
        assert (((label >= lo) & (label < hi)) | (label == -1)).all()
        assert (label >= 0).any()
    # processes: this one and its children (under pytest-xdist other tests' children may live)
    assert r["images"] == 8 and r["processes"] >= 1 and r["wall_s"] > 0 and r["cpu_s"] > 0
    assert len(r["per_batch_rates"]) == 2


def test_sizing_arithmetic():
    assert data_throughput.parse_step_ms("") == data_throughput.ROOFLINE_STEP_MS
    assert data_throughput.parse_step_ms("h100=10") == {**data_throughput.ROOFLINE_STEP_MS, "h100": 10.0}
    step_ms = data_throughput.parse_step_ms("v5e=74,h100=13.9")
    assert step_ms == {"v5e": 74.0, "h100": 13.9}
    with pytest.raises(ValueError, match="CHIP=MS"):
        data_throughput.parse_step_ms("a100=5")
    rows = data_throughput.sizing_rows(20.0, step_ms, images_per_chip=16)
    v5e, h100 = rows
    # v5e-8: 8 chips x 16 images / 0.074 s = 1729.7 images/s; / 20 per core = 86.5 of 112 cores
    assert v5e["images_per_s"] == pytest.approx(8 * 16 / 0.074)
    assert v5e["cores_needed"] == pytest.approx(86.486, abs=1e-3)
    assert (v5e["cores"], v5e["fits"]) == (112, True)
    # 8xH100: 128 / 0.0139 s = 9208.6 images/s; / 20 = 460.4 cores of 104
    assert h100["cores_needed"] == pytest.approx(460.43, abs=1e-2)
    assert (h100["cores"], h100["fits"]) == (104, False)
    table = data_throughput.sizing_table(rows, 20.0)
    assert "| v5e-8 | 8 | 74.0 | 1,730 | 86.5 | 112 | yes |" in table
    assert "| 8xH100 | 8 | 13.9 | 9,209 | 460.4 | 104 | no |" in table
    assert data_throughput.parse_loaders("0:2, 1:1,2") == [(0, 2), (1, 1), (2, 2)]


def test_worker_count_auto_is_one_per_core_but_two():
    cores = len(os.sched_getaffinity(0))
    assert pipeline.resolve_worker_count(-1) == max(0, cores - 2)
    assert pipeline.resolve_worker_count(3) == 3 and pipeline.resolve_worker_count(0) == 0
    with pytest.raises(ValueError, match="data.worker_count must be >= 0 or -1"):
        pipeline.LoaderOptions(worker_count=-2)
