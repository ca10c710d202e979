"""tfds builders on tiny fixtures in the official folder layouts, read back without TensorFlow."""
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ms3_jax.data import builders, classes, prepare, registry, sources, synthetic
from ms3_jax.data.builders import DatasetError

H, W = 16, 20  # every fixture image is 20 wide, 16 high


def _jpg(path, seed=0, h=H, w=W, mode="RGB", fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, format=fmt)


def _label(path, ids, h=H, w=W, mode="L"):
    """A label map whose rows cycle through `ids` (so every id is present)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(ids, dtype=np.uint8)[np.arange(h) % len(ids)][:, None].repeat(w, 1)
    if mode == "P":  # palette image: np.asarray gives the indices, as in Mapillary's PNGs
        img = Image.frombytes("P", (w, h), arr.tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    else:
        img = Image.fromarray(arr).convert(mode)
    img.save(path, format="PNG")
    return arr


def _build(dataset, manual, data_dir, **kw):
    b = builders.prepare(dataset, manual, data_dir, **kw)
    out = {}
    for split in builders.SPLITS:
        name = b.name + (f"/{b.builder_config.name}" if b.builder_config else "")
        src = tfds.data_source(name, split=split, data_dir=str(data_dir))
        out[split] = {ex["file_name"].decode(): ex for ex in (src[i] for i in range(len(src)))}
    return b, out


def _ids(ex):
    return sorted(np.unique(ex["label"]).tolist())


# --------------------------------------------------------------------------- fixtures per layout


def make_voc(root, train=("2008_000002", "2008_000003"), val=("2007_000033",)):
    voc = root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    for k, i in enumerate((*train, *val)):
        _jpg(voc / "JPEGImages" / f"{i}.jpg", seed=k)
        _label(voc / "SegmentationClassAug" / f"{i}.png", [0, 15, 20, 255])
    return voc


def make_ade(root, train=2, val=1):
    ade = root / "ADEChallengeData2016"
    for sub, n in (("training", train), ("validation", val)):
        for k in range(n):
            stem = f"ADE_{sub[:5]}_{k + 1:08d}"
            _jpg(ade / "images" / sub / f"{stem}.jpg", seed=k)
            _label(ade / "annotations" / sub / f"{stem}.png", [0, 1, 150, k + 2])
    return ade


def make_coco(root, label_folder="stuffthingmaps_trainval2017"):
    for sub, stems in (("train2017", ("000000000009", "000000000025")),
                       ("val2017", ("000000000139",))):
        for k, s in enumerate(stems):
            _jpg(root / "images" / sub / f"{s}.jpg", seed=k)
            # 0 person, 11 unused, 12 stop sign, 91 banner (first stuff), 181 wood, 255
            _label(root / label_folder / sub / f"{s}.png", [0, 11, 12, 91, 181, 255])


def make_cityscapes(root):
    for sub, names in (("train", ("aachen/aachen_000000_000019", "bochum/bochum_000000_000313")),
                       ("val", ("lindau/lindau_000000_000019",))):
        for k, n in enumerate(names):
            _jpg(root / "leftImg8bit" / sub / f"{n}_leftImg8bit.png", seed=k, fmt="PNG")
            _label(root / "gtFine" / sub / f"{n}_gtFine_labelIds.png", [7, 26, 33, 0, 9, 255])
            _label(root / "gtFine" / sub / f"{n}_gtFine_color.png", [1, 2])  # ignored file


def make_mapillary(root, labels="v1.2/labels"):
    for sub, stems in (("training", ("a0", "a1", "a2")), ("validation", ("b0",))):
        for k, s in enumerate(stems):
            _jpg(root / sub / "images" / f"{s}.jpg", seed=k)
            _label(root / sub / labels / f"{s}.png", [0, 13, 55, 65], mode="P")


# --------------------------------------------------------------------------------------- classes


def test_class_lists():
    assert {k: len(d.classes) for k, d in registry.DATASETS.items() if not d.synthetic} == {
        "voc": 21, "ade20k": 150, "coco_stuff": 171, "cityscapes": 19, "mapillary": 66}
    assert classes.VOC_CLASSES[0] == "background" and classes.VOC_CLASSES[15] == "person"
    assert classes.ADE20K_CLASSES[:3] == ("wall", "building", "sky")
    assert classes.ADE20K_CLASSES[7] == "bed" and classes.ADE20K_CLASSES[-1] == "flag"
    assert classes.COCO_STUFF_CLASSES[0] == "person" and classes.COCO_STUFF_CLASSES[80] == "banner"
    assert classes.COCO_STUFF_CLASSES[-1] == "wood"
    assert classes.CITYSCAPES_CLASSES[0] == "road" and classes.CITYSCAPES_CLASSES[-1] == "bicycle"
    assert classes.MAPILLARY_CLASSES[13] == "Road" and classes.MAPILLARY_CLASSES[65] == "Unlabeled"
    for d in registry.DATASETS.values():
        assert len(set(d.classes)) == len(d.classes)


def test_id_maps():
    lut = classes.COCO_STUFF_LUT
    assert [lut[i] for i in (0, 10, 11, 12, 25, 90, 91, 181, 182, 255)] == [
        0, 10, 255, 11, 255, 255, 80, 170, 255, 255]
    assert sorted(set(lut.tolist()) - {255}) == list(range(171))
    lut = classes.CITYSCAPES_LUT
    assert [lut[i] for i in (7, 8, 26, 33, 0, 6, 9, 34, 255)] == [0, 1, 13, 18] + [255] * 5
    assert [classes.ADE20K_LUT[i] for i in (0, 1, 150, 151)] == [255, 0, 149, 255]


# -------------------------------------------------------------------------------------- builders


def test_voc(tmp_path):
    make_voc(tmp_path / "m")
    b, out = _build("voc", tmp_path / "m", tmp_path / "d")
    assert b.name == "ms3_voc_aug" and builders.split_sizes(b) == {"train": 2, "validation": 1}
    ex = out["train"]["2008_000002.jpg"]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (H, W, 3)
    assert ex["label"].dtype == np.uint8 and ex["label"].shape == (H, W, 1)
    assert _ids(ex) == [0, 15, 20, 255]  # 255 stays ignore
    assert b.info.metadata["classes"] == list(classes.VOC_CLASSES)


def test_ade20k_reduce_zero_label(tmp_path):
    make_ade(tmp_path / "m")
    _, out = _build("ade20k", tmp_path / "m", tmp_path / "d")
    assert len(out["train"]) == 2 and len(out["validation"]) == 1
    ex = out["train"]["ADE_train_00000001.jpg"]
    raw = np.asarray(Image.open(
        tmp_path / "m/ADEChallengeData2016/annotations/training/ADE_train_00000001.png"))
    label = ex["label"][..., 0]
    assert (label[raw == 0] == 255).all() and (label[raw == 1] == 0).all()
    assert (label[raw == 150] == 149).all()
    assert _ids(ex) == [0, 1, 149, 255]
    # the stored JPEG is the original file: decoded pixels are identical
    orig = np.asarray(Image.open(
        tmp_path / "m/ADEChallengeData2016/images/training/ADE_train_00000001.jpg"))
    np.testing.assert_array_equal(ex["image"], orig)


def test_coco_stuff_182_to_171(tmp_path):
    make_coco(tmp_path / "m")
    b, out = _build("coco_stuff164k", tmp_path / "m", tmp_path / "d")
    assert builders.split_sizes(b) == {"train": 2, "validation": 1}
    ex = out["validation"]["000000000139.jpg"]
    label = ex["label"][:6, 0, 0].tolist()
    assert label == [0, 255, 11, 80, 170, 255]  # rows hold raw 0, 11, 12, 91, 181, 255


def test_coco_stuff_mmseg_annotations_folder(tmp_path):
    make_coco(tmp_path / "m", label_folder="annotations")
    # MMSeg's converted maps sit next to the raw ones and must be ignored
    _label(tmp_path / "m/annotations/val2017/000000000139_labelTrainIds.png", [3])
    _, out = _build("coco_stuff", tmp_path / "m", tmp_path / "d")
    assert set(out["validation"]) == {"000000000139.jpg"}


def test_cityscapes_label_ids(tmp_path):
    make_cityscapes(tmp_path / "m")
    b, out = _build("cityscapes", tmp_path / "m", tmp_path / "d")
    assert builders.split_sizes(b) == {"train": 2, "validation": 1}
    ex = out["train"]["aachen/aachen_000000_000019_leftImg8bit.png"]
    assert ex["image"].shape == (H, W, 3) and ex["label"].shape == (H, W, 1)
    # rows: labelId 7 road -> 0, 26 car -> 13, 33 bicycle -> 18, 0 and 9 (unmapped) -> 255
    assert ex["label"][:6, 0, 0].tolist() == [0, 13, 18, 255, 255, 255]


def test_mapillary(tmp_path):
    make_mapillary(tmp_path / "m")
    b, out = _build("mapillary", tmp_path / "m", tmp_path / "d")
    assert builders.split_sizes(b) == {"train": 3, "validation": 1}
    assert _ids(out["validation"]["b0.jpg"]) == [0, 13, 55, 65]  # 65 'Unlabeled' kept


def test_mapillary_labels_under_split_and_unlabeled_as_ignore(tmp_path):
    make_mapillary(tmp_path / "m", labels="labels")
    _, out = _build("mapillary", tmp_path / "m", tmp_path / "d",
                    config="v1.2_unlabeled_ignored")
    assert _ids(out["train"]["a1.jpg"]) == [0, 13, 55, 255]
    assert (tmp_path / "d/ms3_mapillary/v1.2_unlabeled_ignored/1.0.0").is_dir()


def test_ade20k_from_zip(tmp_path):
    make_ade(tmp_path / "src", train=1, val=1)
    (tmp_path / "m").mkdir()
    with zipfile.ZipFile(tmp_path / "m" / "ADEChallengeData2016.zip", "w") as z:
        for f in sorted((tmp_path / "src").rglob("*.*")):
            z.write(f, f.relative_to(tmp_path / "src"))
    b, out = _build("ade20k", tmp_path / "m", tmp_path / "d")
    assert builders.split_sizes(b) == {"train": 1, "validation": 1}


def test_coco_stuff_from_zips(tmp_path):
    make_coco(tmp_path / "src")
    (tmp_path / "m").mkdir()
    for name, folder in (("train2017.zip", "images/train2017"), ("val2017.zip", "images/val2017"),
                         ("stuffthingmaps_trainval2017.zip", "stuffthingmaps_trainval2017")):
        base = (tmp_path / "src" / folder).parent if name != "stuffthingmaps_trainval2017.zip" \
            else tmp_path / "src" / folder
        with zipfile.ZipFile(tmp_path / "m" / name, "w") as z:
            for f in sorted((tmp_path / "src" / folder).rglob("*.*")):
                z.write(f, f.relative_to(base))  # train2017/x.jpg ... as in the official zips
    b, out = _build("coco_stuff", tmp_path / "m", tmp_path / "d")
    assert builders.split_sizes(b) == {"train": 2, "validation": 1}
    assert out["validation"]["000000000139.jpg"]["label"][:6, 0, 0].tolist() == [
        0, 255, 11, 80, 170, 255]


def test_voc_deeplab_style_list(tmp_path):
    voc = make_voc(tmp_path / "m")
    (voc / "ImageSets/Segmentation/val.txt").write_text(
        "/JPEGImages/2007_000033.jpg /SegmentationClassAug/2007_000033.png\n")
    b, _ = _build("voc", tmp_path / "m", tmp_path / "d")
    assert builders.split_sizes(b)["validation"] == 1


def test_source_helper_and_grayscale_jpeg_reencoded(tmp_path):
    make_ade(tmp_path / "m", train=1, val=1)
    _jpg(tmp_path / "m/ADEChallengeData2016/images/training/ADE_train_00000001.jpg", mode="L")
    builders.prepare("ade20k", tmp_path / "m", tmp_path / "d")
    src = sources.open_sources(["ade20k"], "train", str(tmp_path / "d"))[0]
    assert len(src) == 1 and src[0]["image"].shape == (H, W, 3)


# ------------------------------------------------------------------------------------- bad input


def _fails(match, dataset, manual, data_dir, **kw):
    with pytest.raises(DatasetError, match=match) as e:
        builders.prepare(dataset, manual, data_dir, **kw)
    return str(e.value)


def test_missing_manual_dir(tmp_path):
    _fails(str(tmp_path / "nope"), "ade20k", tmp_path / "nope", tmp_path / "d")
    # the builder itself (without `prepare`'s check) names it too
    (tmp_path / "empty").mkdir()
    b = builders.Ms3Ade20k(data_dir=str(tmp_path / "d"), file_format="array_record")
    with pytest.raises(DatasetError, match=str(tmp_path / "empty")):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(tmp_path / "empty")))


def test_missing_split_folder(tmp_path):
    make_ade(tmp_path / "m")
    for f in (tmp_path / "m/ADEChallengeData2016/annotations/validation").iterdir():
        f.unlink()
    (tmp_path / "m/ADEChallengeData2016/annotations/validation").rmdir()
    msg = _fails("ADEChallengeData2016/annotations/validation", "ade20k", tmp_path / "m",
                 tmp_path / "d")
    assert "ADEChallengeData2016.zip" in msg  # says that the archive would do too


def test_missing_split_list(tmp_path):
    voc = make_voc(tmp_path / "m")
    (voc / "ImageSets/Segmentation/val.txt").unlink()
    _fails("ImageSets/Segmentation/val.txt", "voc", tmp_path / "m", tmp_path / "d")


def test_image_without_label(tmp_path):
    make_ade(tmp_path / "m")
    (tmp_path / "m/ADEChallengeData2016/annotations/training/ADE_train_00000002.png").unlink()
    msg = _fails("ADE_train_00000002.jpg has no label", "ade20k", tmp_path / "m", tmp_path / "d")
    assert "annotations/training/ADE_train_00000002.png" in msg
    assert "more" not in msg
    (tmp_path / "m/ADEChallengeData2016/annotations/training/ADE_train_00000001.png").unlink()
    _fails("ADE_train_00000001.jpg has no label.*\\(and 1 more\\)", "ade20k", tmp_path / "m",
           tmp_path / "d")


def test_label_without_image(tmp_path):
    make_coco(tmp_path / "m")
    (tmp_path / "m/images/val2017/000000000139.jpg").unlink()
    _jpg(tmp_path / "m/images/val2017/000000000285.jpg")
    _label(tmp_path / "m/stuffthingmaps_trainval2017/val2017/000000000285.png", [1])
    _fails("val2017/000000000139.png has no image", "coco_stuff", tmp_path / "m", tmp_path / "d")


def test_voc_listed_label_missing(tmp_path):
    voc = make_voc(tmp_path / "m")
    (voc / "SegmentationClassAug/2008_000003.png").unlink()
    _fails("SegmentationClassAug/2008_000003.png", "voc", tmp_path / "m", tmp_path / "d")


def test_corrupt_image_fails_or_is_skipped(tmp_path):
    make_mapillary(tmp_path / "m")
    bad = tmp_path / "m/training/images/a1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated JPEG
    _fails("corrupt image .*training/images/a1.jpg", "mapillary", tmp_path / "m", tmp_path / "d")
    b, out = _build("mapillary", tmp_path / "m", tmp_path / "d2", skip_corrupt=True)
    assert set(out["train"]) == {"a0.jpg", "a2.jpg"}
    assert b.skipped == {"train": ["a1.jpg"], "validation": []}
    assert b.info.metadata["skipped"] == {"train": 1, "validation": 0}


def test_label_id_out_of_range(tmp_path):
    make_cityscapes(tmp_path / "m")
    _label(tmp_path / "m/gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", [7, 40])
    msg = _fails("lindau_000000_000019_gtFine_labelIds.png has ids \\[40\\]", "cityscapes",
                 tmp_path / "m", tmp_path / "d")
    assert "0..33, 255" in msg
    make_ade(tmp_path / "a")
    _label(tmp_path / "a/ADEChallengeData2016/annotations/validation/ADE_valid_00000001.png",
           [0, 151])
    _fails("ADE_valid_00000001.png has ids \\[151\\]", "ade20k", tmp_path / "a", tmp_path / "d")


def test_size_mismatch(tmp_path):
    make_voc(tmp_path / "m")
    _label(tmp_path / "m/VOCdevkit/VOC2012/SegmentationClassAug/2007_000033.png", [1], h=8)
    _fails("size mismatch: image .*2007_000033.jpg is 20x16 but label .*2007_000033.png is 20x8",
           "voc", tmp_path / "m", tmp_path / "d")


def test_rgb_label_rejected(tmp_path):
    make_mapillary(tmp_path / "m")
    _label(tmp_path / "m/validation/v1.2/labels/b0.png", [1, 2], mode="RGB")
    _fails("b0.png is not a single-channel", "mapillary", tmp_path / "m", tmp_path / "d")


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="'kitti'; valid names: .*ade20k.*cityscapes.*synth_a"):
        registry.get("kitti")
    with pytest.raises(DatasetError, match="'synth_a'; valid names: .*ade20k") as e:
        registry.get("synth_a", real_only=True)
    assert "synth_b" not in str(e.value)


def test_registry_is_consistent():
    """Every entry has classes and a builder; real ones a prepare choice and a fine-tuning config
    (configs/finetune/<name>.py) with the entry's defaults, synthetic ones their spec."""
    import importlib
    import pickle
    help_ = prepare._parser().format_help()
    assert set(registry.DATASETS) == {"voc", "ade20k", "coco_stuff", "cityscapes", "mapillary",
                                      *synthetic.SYNTHETIC_DATASETS}
    for name, d in registry.DATASETS.items():
        assert d.name == name and d.classes and all(isinstance(c, str) for c in d.classes)
        assert issubclass(d.builder, tfds.core.GeneratorBasedBuilder)
        for alias in (name, d.builder.name, *d.aliases):
            assert registry.get(alias) is d
        if d.synthetic:
            assert d.classes == synthetic.SPEC_BY_NAME[name].class_names and d.finetune is None
            assert d.builder is synthetic.BUILDERS[name] and d.builder.name == name
            assert pickle.loads(pickle.dumps(d.builder)) is d.builder  # grain's workers
            continue
        assert registry.get(name, real_only=True) is d and name in help_
        assert d.builder.name.startswith("ms3_") and d.builder.OFFICIAL_SIZES
        config = importlib.import_module(f"configs.finetune.{name}").get_config()
        assert config.data.dataset == name
        f = d.finetune
        assert (config.data.crop_size, config.batch_size, config.num_steps,
                config.data.augment.base_size, config.eval.short_side,
                config.eval.num_devices) == (f["crop_size"], f["batch_size"], f["num_steps"],
                                             f["base_size"], f["base_size"],
                                             f.get("eval_devices", 1))


# ------------------------------------------------------------------------------------------ CLI


def test_prepare_cli(tmp_path, capsys, monkeypatch):
    make_cityscapes(tmp_path / "m")
    prepare.main(["--dataset", "cityscapes", "--manual_dir", str(tmp_path / "m"),
                  "--data_dir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "ms3_cityscapes" in out and "train: 2" in out and "validation: 1" in out
    assert "skipped: 0" in out
    assert len(sources.open_sources(["cityscapes"], "validation", str(tmp_path / "d"))[0]) == 1
    # again: already prepared, the summary comes from the stored dataset info
    prepare.main(["--dataset", "ms3_cityscapes", "--manual_dir", str(tmp_path / "m"),
                  "--data_dir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "train: 2" in out and "skipped: 0" in out
    with pytest.raises(SystemExit):
        prepare.main(["--dataset", "kitti", "--manual_dir", str(tmp_path / "m"),
                      "--data_dir", str(tmp_path / "d")])
    assert "valid names" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter
def test_prepared_files_read_without_this_package(tmp_path, capsys):
    """A fresh process reads the prepared files without this package and without TensorFlow."""
    make_cityscapes(tmp_path / "m")
    prepare.main(["--dataset", "cityscapes", "--manual_dir", str(tmp_path / "m"),
                  "--data_dir", str(tmp_path / "d")])
    assert "train: 2" in capsys.readouterr().out
    code = ("import sys, tensorflow_datasets as tfds\n"
            "src = tfds.data_source('ms3_cityscapes', split='train', data_dir=sys.argv[1])\n"
            "ex = src[0]\n"
            "print(len(src), ex['image'].shape, ex['label'].dtype,\n"
            "      type(ex['file_name']).__name__,\n"
            "      'tensorflow' in sys.modules, 'ms3_jax' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.stdout.split("\n")[-2] == "2 (16, 20, 3) uint8 bytes False False", res.stderr


# ------------------------------------------------------------------------ tfds's own builders


def test_from_tfds_cityscapes_mock():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=1):
        ex = tfds.data_source("cityscapes", split="train")[0]
    raw = ex["segmentation_label"][..., 0]
    raw[:2] = 7  # mock labels are random 0..255; put known ids where we check them
    raw[2:] = 26
    raw[-1] = 9
    ex["segmentation_label"] = raw[..., None]
    rec = builders.from_tfds_example(ex, "cityscapes")
    assert rec["image"].shape == (1024, 2048, 3) and rec["label"].shape == (1024, 2048, 1)
    assert rec["label"][0, 0, 0] == 0 and rec["label"][5, 0, 0] == 13
    assert rec["label"][-1, 0, 0] == 255
    raw[0, 0] = 200
    with pytest.raises(DatasetError, match="labelIds \\[200\\]"):
        builders.from_tfds_example(ex, "cityscapes")
    with pytest.raises(DatasetError, match="instance annotations"):
        builders.from_tfds_example({}, "scene_parse150")
