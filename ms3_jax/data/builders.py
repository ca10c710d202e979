"""tfds builders for the five segmentation datasets (paper App. A), read from `manual_dir`.

Record format (`features()`), layouts, archives and error handling: docs/usage.md,
"Datasets". Why not tfds's own builders: docs/choices.md, "Our own tfds builders".
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import os
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

from ms3_jax.data import classes

IGNORE_INDEX = classes.IGNORE_INDEX
JPEG_QUALITY = 95
SPLITS = ("train", "validation")


class DatasetError(ValueError):
    """Bad or missing input data; the message names the file or folder."""


def features() -> tfds.features.FeaturesDict:
    """The shared record format (docs/usage.md, "Record format")."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
        "file_name": tfds.features.Text(),
    })


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example on disk: its image, its raw label map and the name it is stored under."""
    image: epath.Path
    label: epath.Path
    file_name: str


class CorruptFileError(DatasetError):
    """A file PIL cannot decode (skippable with `skip_corrupt=True`)."""


def _open(path: epath.Path, what: str) -> tuple[bytes, Image.Image]:
    data = path.read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: truncated / corrupt files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptFileError(f"corrupt {what} {path}: {e}") from None
    return data, img


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    """`img` encoded as "JPEG" (quality `JPEG_QUALITY`) or "PNG"."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buf.getvalue()


def encode_image(path: epath.Path) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of an RGB image and its (height, width); re-encodes only non-RGB-JPEG files."""
    data, img = _open(path, "image")
    if img.format != "JPEG" or img.mode != "RGB":
        data = image_bytes(img.convert("RGB"), "JPEG")
    return data, (img.height, img.width)


def encode_label(path: epath.Path, lut: np.ndarray, valid: np.ndarray) -> tuple[bytes, np.ndarray]:
    """PNG bytes of `lut[raw]` (uint8 train ids) after checking every raw id is in `valid`."""
    _, img = _open(path, "label")
    if img.mode not in ("L", "P", "I", "I;16"):
        raise DatasetError(
            f"label {path} is not a single-channel id map (PIL mode {img.mode!r}); expected an "
            "8-bit grayscale or palette PNG")
    raw = np.asarray(img)
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DatasetError(f"label {path} has ids outside 0..255 "
                               f"(min {raw.min()}, max {raw.max()})")
        raw = raw.astype(np.uint8)
    bad = np.flatnonzero((np.bincount(raw.ravel(), minlength=256) > 0) & ~valid)
    if bad.size:
        raise DatasetError(f"label {path} has ids {bad.tolist()} outside this dataset's valid "
                           f"ids {_describe(valid)}")
    train_ids = lut[raw]
    return image_bytes(Image.fromarray(train_ids), "PNG"), train_ids


def encode_pair(pair: Pair, lut: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    """One record in the shared format; raises `DatasetError` naming the file on bad input."""
    image, (h, w) = encode_image(pair.image)
    label, train_ids = encode_label(pair.label, lut, valid)
    if train_ids.shape != (h, w):
        raise DatasetError(
            f"size mismatch: image {pair.image} is {w}x{h} but label {pair.label} is "
            f"{train_ids.shape[1]}x{train_ids.shape[0]} (width x height)")
    return {"image": image, "label": label, "file_name": pair.file_name}


def _describe(valid: np.ndarray) -> str:
    ids = np.flatnonzero(valid)
    runs, start = [], ids[0]
    for a, b in zip(ids, list(ids[1:]) + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}..{a}")
            start = b
    return "{" + ", ".join(runs) + "}"


def _valid(ids) -> np.ndarray:
    return np.isin(np.arange(256), list(ids))


# Listing files (cheap; every pairing error is found here, before decoding anything).

def _require_dir(path: epath.Path, what: str, hint: str = "") -> epath.Path:
    if not path.is_dir():
        raise DatasetError(f"expected the {what} folder at {path}, which does not exist{hint}")
    return path


def _files(folder: epath.Path, suffix: str, recursive: bool = False) -> dict[str, epath.Path]:
    """{path relative to `folder` without `suffix`: path} of the files ending in `suffix`."""
    out = {}
    root = os.fspath(folder)
    walker = os.walk(root) if recursive else [(root, None, os.listdir(root))]
    for dirpath, _, names in walker:
        for n in names:
            if n.endswith(suffix) and not n.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, n), root)
                out[rel[: -len(suffix)]] = folder / rel
    return out


def _pair_folders(image_dir: epath.Path, image_suffix: str, label_dir: epath.Path,
                  label_suffix: str, recursive: bool = False,
                  label_exclude: str | None = None) -> list[Pair]:
    """Pairs by stem; an image without a label (or the reverse) is an error naming the file."""
    images = _files(image_dir, image_suffix, recursive)
    labels = _files(label_dir, label_suffix, recursive)
    if label_exclude:
        labels = {k: v for k, v in labels.items() if not k.endswith(label_exclude)}
    if not images:
        raise DatasetError(f"no '*{image_suffix}' images found in {image_dir}")
    if missing := sorted(images.keys() - labels.keys()):
        raise DatasetError(f"image {images[missing[0]]} has no label: expected "
                           f"{label_dir / (missing[0] + label_suffix)}{_more(missing)}")
    if missing := sorted(labels.keys() - images.keys()):
        raise DatasetError(f"label {labels[missing[0]]} has no image: expected "
                           f"{image_dir / (missing[0] + image_suffix)}{_more(missing)}")
    return [Pair(images[s], labels[s], s + image_suffix) for s in sorted(images)]


def _more(missing: list[str]) -> str:
    return f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""


def _extract(archive: epath.Path, dest: epath.Path) -> epath.Path:
    """Extract a zip/tar once into `dest` (a `.done` marker makes it idempotent)."""
    done = dest / ".done"
    if done.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    logging.info("extracting %s to %s", archive, dest)
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(os.fspath(archive)) as z:
                z.extractall(os.fspath(dest))
        else:
            with tarfile.open(os.fspath(archive)) as t:
                t.extractall(os.fspath(dest), filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DatasetError(f"cannot extract archive {archive}: {e}") from None
    done.touch()
    return dest


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared logic; subclasses set the class attributes and implement `_list_split`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: dataset-local train ids, 255 = ignore."}
    LUT: np.ndarray                    # raw id -> train id (uint8[256])
    VALID_RAW: np.ndarray              # bool[256]: raw ids that may occur in a label file
    OFFICIAL_SIZES: dict[str, int] = {}
    ARCHIVES: tuple[str, ...] = ()
    HOMEPAGE = ""
    CITATION = ""

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds's default checks `isinstance(p, importlib_resources.abc.Traversable)` for builders
        # outside its package, and that backport is not a dependency we have.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, skip_corrupt: bool = False, progress: bool = False, **kwargs):
        self.skip_corrupt, self.progress = skip_corrupt, progress
        self.skipped: dict[str, list[str]] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        from ms3_jax.data import registry  # (it imports this module)
        entry = registry.get(self.name)
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"{entry.name}: images with dataset-local train ids "
                         f"0..{len(entry.classes) - 1}, 255 = ignore (ms3_jax)."),
            features=features(), supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE, citation=self.CITATION,
            metadata=tfds.core.MetadataDict(
                dataset=entry.name, classes=list(entry.classes), ignore_index=IGNORE_INDEX))

    def _manual_root(self, dl_manager) -> epath.Path:
        try:
            return epath.Path(dl_manager.manual_dir)
        except AssertionError as e:  # tfds: "Manual directory X does not exist or is empty."
            raise DatasetError(f"{self.name}: {e}") from None

    def _find(self, dl_manager, candidates: Sequence[tuple[str | None, str]], what: str) -> epath.Path:
        """First existing folder among (archive or None for manual_dir, relative path)."""
        root = self._manual_root(dl_manager)
        for archive, rel in candidates:
            base = root if archive is None else self._archive_root(dl_manager, archive)
            if base is None:
                continue
            # archives may wrap their content in one extra top-level folder
            wrapped = [c / rel for c in base.iterdir() if c.is_dir()] if archive else []
            for path in [base / rel, *wrapped]:
                if path.is_dir():
                    return path
        archives = sorted({a for a, _ in candidates if a})
        hint = f" (or put {' + '.join(archives)} in {root})" if archives else ""
        return _require_dir(root / candidates[0][1], what, hint)

    def _archive_root(self, dl_manager, archive: str) -> epath.Path | None:
        path = self._manual_root(dl_manager) / archive
        extracted = epath.Path(dl_manager.download_dir) / "extracted" / archive
        return _extract(path, extracted) if path.exists() else None

    def _list_split(self, dl_manager, split: str) -> list[Pair]:
        """Abstract hook: each dataset builder lists its (image, label) pairs of `split`."""
        raise NotImplementedError(f"{type(self).__name__} must override _list_split")

    def _split_generators(self, dl_manager):
        self._manual_root(dl_manager)
        pairs = {split: self._list_split(dl_manager, split) for split in SPLITS}  # all, first
        return {split: self._generate_examples(split, p) for split, p in pairs.items()}

    def _generate_examples(self, split: str, pairs: list[Pair]) -> Iterator[tuple[str, dict]]:
        skipped = self.skipped.setdefault(split, [])
        bar = tqdm.tqdm(pairs, desc=f"{self.name} {split}", unit="img", disable=not self.progress)
        for pair in bar:
            try:
                example = encode_pair(pair, self.LUT, self.VALID_RAW)
            except CorruptFileError as e:
                if not self.skip_corrupt:
                    raise DatasetError(
                        f"{e} (pass skip_corrupt=True / --skip_corrupt to skip such files)"
                    ) from None
                logging.warning("skipping %s", e)
                skipped.append(pair.file_name)
                bar.set_postfix(skipped=len(skipped))
                continue
            yield pair.file_name, example
        self.info.metadata["skipped"] = {k: len(v) for k, v in self.skipped.items()}
        self.info.metadata["skipped_files"] = {k: v[:1000] for k, v in self.skipped.items()}


class Ms3VocAug(SegmentationBuilder):
    """PASCAL VOC 2012 with SBD-augmented labels (MMSeg's `voc_aug` layout), 21 classes, ids kept."""

    name = "ms3_voc_aug"
    LUT = classes.VOC_LUT
    VALID_RAW = _valid([*range(21), 255])
    OFFICIAL_SIZES = {"train": 10582, "validation": 1449}
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put VOC2012 and the SBD-augmented labels in MMSeg's layout under manual_dir:
      VOCdevkit/VOC2012/JPEGImages/*.jpg
      VOCdevkit/VOC2012/SegmentationClassAug/*.png
      VOCdevkit/VOC2012/ImageSets/Segmentation/{train_aug.txt,val.txt}
    (MMSeg's tools/dataset_converters/voc_aug.py makes SegmentationClassAug and train_aug.txt.)
    """

    def _list_split(self, dl_manager, split):
        voc = self._manual_root(dl_manager) / "VOCdevkit" / "VOC2012"
        image_dir = _require_dir(voc / "JPEGImages", "VOC2012 JPEGImages")
        label_dir = _require_dir(voc / "SegmentationClassAug", "VOC SegmentationClassAug")
        list_file = voc / "ImageSets" / "Segmentation" / (
            "train_aug.txt" if split == "train" else "val.txt")
        if not list_file.is_file():
            raise DatasetError(f"expected the {split} split list at {list_file}, which does "
                               "not exist (train_aug.txt is made by MMSeg's voc_aug.py)")
        # one id per line; DeepLab-style lines "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
        # are accepted too (the first column's stem is the id)
        ids = [os.path.splitext(os.path.basename(line.split()[0]))[0]
               for line in list_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(f"split list {list_file} is empty")
        pairs = []
        for i in ids:
            image, label = image_dir / f"{i}.jpg", label_dir / f"{i}.png"
            if not image.is_file():
                raise DatasetError(f"image {image} listed in {list_file} does not exist")
            if not label.is_file():
                raise DatasetError(f"image {image} has no label: expected {label}")
            pairs.append(Pair(image, label, f"{i}.jpg"))
        return pairs


class Ms3Ade20k(SegmentationBuilder):
    """ADE20K SceneParsing (ADEChallengeData2016), 150 classes, reduce-zero-label: 0 -> 255, k -> k-1."""

    name = "ms3_ade20k"
    LUT = classes.ADE20K_LUT
    VALID_RAW = _valid(range(151))
    OFFICIAL_SIZES = {"train": 20210, "validation": 2000}
    ARCHIVES = ("ADEChallengeData2016.zip",)
    HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put ADEChallengeData2016.zip, or its extracted folder, in manual_dir:
      ADEChallengeData2016/images/{training,validation}/*.jpg
      ADEChallengeData2016/annotations/{training,validation}/*.png
    """

    def _list_split(self, dl_manager, split):
        sub = "training" if split == "train" else "validation"
        zip_ = self.ARCHIVES[0]
        img = self._find(dl_manager, [(None, f"ADEChallengeData2016/images/{sub}"),
                                      (zip_, f"ADEChallengeData2016/images/{sub}")],
                         f"ADE20K {split} images")
        lab = self._find(dl_manager, [(None, f"ADEChallengeData2016/annotations/{sub}"),
                                      (zip_, f"ADEChallengeData2016/annotations/{sub}")],
                         f"ADE20K {split} annotations")
        return _pair_folders(img, ".jpg", lab, ".png")


class Ms3CocoStuff164k(SegmentationBuilder):
    """COCO-Stuff-164k, 171 classes: the raw stuffthingmaps' 182 ids -> 171 (`classes.COCO_STUFF_LUT`,
    the 11 unused ids -> 255); MMSeg's `*_labelTrainIds.png` are ignored."""

    name = "ms3_coco_stuff164k"
    LUT = classes.COCO_STUFF_LUT
    VALID_RAW = _valid([*range(182), 255])
    OFFICIAL_SIZES = {"train": 118287, "validation": 5000}
    ARCHIVES = ("train2017.zip", "val2017.zip", "stuffthingmaps_trainval2017.zip")
    HOMEPAGE = "https://github.com/nightrome/cocostuff"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put train2017.zip, val2017.zip and stuffthingmaps_trainval2017.zip, or their extracted
    folders, in manual_dir:
      images/{train2017,val2017}/*.jpg
      stuffthingmaps_trainval2017/{train2017,val2017}/*.png   (or MMSeg's annotations/...)
    """

    def _list_split(self, dl_manager, split):
        sub = "train2017" if split == "train" else "val2017"
        img = self._find(dl_manager, [(None, f"images/{sub}"), (None, sub),
                                      (f"{sub}.zip", sub)], f"COCO {split} images")
        lab = self._find(dl_manager, [(None, f"stuffthingmaps_trainval2017/{sub}"),
                                      (None, f"annotations/{sub}"),
                                      (self.ARCHIVES[2], sub)],
                         f"COCO-Stuff {split} stuffthingmaps")
        return _pair_folders(img, ".jpg", lab, ".png", label_exclude="_labelTrainIds")


class Ms3Cityscapes(SegmentationBuilder):
    """Cityscapes gtFine: labelId -> 19 trainIds, others 255 (`classes.CITYSCAPES_LUT`)."""

    name = "ms3_cityscapes"
    LUT = classes.CITYSCAPES_LUT
    VALID_RAW = _valid([*range(34), 255])
    OFFICIAL_SIZES = {"train": 2975, "validation": 500}
    ARCHIVES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
    HOMEPAGE = "https://www.cityscapes-dataset.com/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, or their extracted folders,
    in manual_dir:
      leftImg8bit/{train,val}/<city>/*_leftImg8bit.png
      gtFine/{train,val}/<city>/*_gtFine_labelIds.png
    """

    def _list_split(self, dl_manager, split):
        sub = "train" if split == "train" else "val"
        img = self._find(dl_manager, [(None, f"leftImg8bit/{sub}"),
                                      (self.ARCHIVES[0], f"leftImg8bit/{sub}")],
                         f"Cityscapes {split} leftImg8bit")
        lab = self._find(dl_manager, [(None, f"gtFine/{sub}"),
                                      (self.ARCHIVES[1], f"gtFine/{sub}")],
                         f"Cityscapes {split} gtFine")
        return _pair_folders(img, "_leftImg8bit.png", lab, "_gtFine_labelIds.png", recursive=True)


class Ms3Mapillary(SegmentationBuilder):
    """Mapillary Vistas v1.2, 66 classes, ids kept. 65 'Unlabeled' stays a class, as in MMSeg
    (`MapillaryDataset_v1` lists it, its configs use `num_classes=66`) and the paper (66
    categories); config `v1.2_unlabeled_ignored` maps it to 255 instead."""

    name = "ms3_mapillary"
    VALID_RAW = _valid(range(66))
    OFFICIAL_SIZES = {"train": 18000, "validation": 2000}
    ARCHIVES = ("mapillary-vistas-dataset_public_v1.2.zip",)
    HOMEPAGE = "https://www.mapillary.com/dataset/vistas"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put mapillary-vistas-dataset_public_v1.2.zip, or its extracted folders, in manual_dir:
      {training,validation}/images/*.jpg
      {training,validation}/v1.2/labels/*.png   (or {training,validation}/labels/*.png)
    """

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="v1.2", description="66 classes, 65 'Unlabeled' kept (MMSeg, paper)."),
        tfds.core.BuilderConfig(name="v1.2_unlabeled_ignored", description="65 'Unlabeled' -> 255 (ignore)."),
    ]
    DEFAULT_CONFIG_NAME = "v1.2"

    @property
    def LUT(self) -> np.ndarray:  # noqa: N802 (a class constant on the other builders)
        if self.builder_config.name == "v1.2_unlabeled_ignored":
            lut = classes.MAPILLARY_LUT.copy()
            lut[65] = IGNORE_INDEX
            return lut
        return classes.MAPILLARY_LUT

    def _list_split(self, dl_manager, split):
        sub = "training" if split == "train" else "validation"
        zip_ = self.ARCHIVES[0]
        img = self._find(dl_manager, [(None, f"{sub}/images"), (zip_, f"{sub}/images")],
                         f"Mapillary {split} images")
        lab = self._find(dl_manager, [(None, f"{sub}/v1.2/labels"), (None, f"{sub}/labels"),
                                      (zip_, f"{sub}/v1.2/labels"), (zip_, f"{sub}/labels")],
                         f"Mapillary v1.2 {split} labels")
        return _pair_folders(img, ".jpg", lab, ".png")


def from_tfds_example(example: dict[str, Any], dataset: str) -> dict[str, Any]:
    """A decoded example of tfds's `cityscapes` (config `semantic_segmentation`: `image_left`, raw
    labelIds in `segmentation_label`) -> our record, decoded as `tfds.data_source` reads one:
    {"image": uint8 [H, W, 3], "label": uint8 [H, W, 1], "file_name": str}. Other builders
    (`scene_parse150`: instance maps; docs/choices.md, "Our own tfds builders") raise."""
    if dataset == "cityscapes":
        raw = np.asarray(example["segmentation_label"])
        if raw.ndim == 3:
            raw = raw[..., 0]
        bad = np.flatnonzero((np.bincount(raw.astype(np.int64).ravel(), minlength=256) > 0)
                             & ~Ms3Cityscapes.VALID_RAW)
        image_id = example.get("image_id", "")
        image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
        if bad.size:
            raise DatasetError(f"cityscapes example {image_id!r} has labelIds {bad.tolist()} "
                               "outside 0..33, 255")
        image = np.asarray(example["image_left"], dtype=np.uint8)
        label = classes.CITYSCAPES_LUT[raw.astype(np.uint8)][..., None]
        if image.shape[:2] != label.shape[:2]:
            raise DatasetError(f"cityscapes example {image_id!r}: image {image.shape[:2]} and "
                               f"label {label.shape[:2]} sizes differ")
        return {"image": image, "label": label, "file_name": image_id + "_leftImg8bit.png"}
    if dataset in ("scene_parse150", "ade20k"):
        raise DatasetError(
            "tfds's scene_parse150 stores the Places-2017 instance annotations (R channel = one "
            "of 100 object categories), not the 150-class ADE20K maps; use ms3_ade20k instead")
    raise DatasetError(f"no conversion from tfds examples for {dataset!r} (only 'cityscapes')")


def prepare(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
            skip_corrupt: bool = False, progress: bool = False, **builder_kwargs
            ) -> SegmentationBuilder:
    """Build a dataset (`registry.get`) into `data_dir` (array_record); returns the builder."""
    from ms3_jax.data import registry  # (it imports this module)
    cls = registry.get(dataset, real_only=True).builder
    manual = epath.Path(manual_dir)
    if not manual.is_dir():
        raise DatasetError(f"manual_dir {manual} does not exist; expected:\n"
                           f"{tfds.core.utils.dedent(cls.MANUAL_DOWNLOAD_INSTRUCTIONS)}")
    builder = cls(data_dir=os.fspath(data_dir), file_format="array_record",
                  skip_corrupt=skip_corrupt, progress=progress, **builder_kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
    return builder


def split_sizes(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
    return {name: info.num_examples for name, info in builder.info.splits.items()}

