r"""Predict with a fine-tuned segmentor (Tab. 2 / 3 workdirs): images or folders in, label maps out.

  python -m ms3_jax.predict --workdir W3 --image photo.jpg more/ --out out/
  python -m ms3_jax.predict --workdir W3 --image s.png --mode slide --crop 512 --stride 341 --flip

Inference as the workdir's evaluation does it (`config.eval`, each option overridable); writes
the files `ms3_jax.zero_shot` writes (`visualize.write_outputs`, atomic). docs/usage.md,
"Fine-tuning and prediction".

Bad input, as in `ms3_jax.zero_shot`: checked before the model loads (every image opened and
fully decoded, the output directory writable); an image named on the command line that cannot
be read is a one-line `error: ...` and exit code 2 (`--verbose`: the traceback). An unreadable
file found in a FOLDER is skipped instead: one `WARNING:` line each, their count at the end;
exit code 0 when some images were segmented, 2 when none could be. Inputs whose outputs would
share a name (`a.png a.jpg sub/a.png`) are disambiguated (`visualize.output_stems`: `a_*`,
`a_jpg_*`, `a_png_*`), the renaming logged on stderr.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np

from ms3_jax.data.eval_data import resize_short_side
from ms3_jax.data.images import read_image
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.engine import checkpointing, exit_codes
from ms3_jax.evaluation import evaluate
from ms3_jax.evaluation.visualize import check_outputs_spare_inputs, output_stems, write_outputs
from ms3_jax.files import safe
from ms3_jax.stages import finetune

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Segmentor:
    """A fine-tuned DeepLab-v3+ restored from a workdir, with its class names and eval settings."""

    def __init__(self, workdir: str, step: int | None = None):
        config = checkpointing.read_config(workdir)  # FileNotFoundError naming config.json
        if config.get("mode") != "finetune":
            raise ValueError(
                f"{workdir} is a {config.get('mode')!r} workdir, not a fine-tuned segmentor; "
                "for zero-shot segmentation with any class names use python -m ms3_jax.zero_shot "
                f"--workdir {workdir} --classes ...")
        self.class_names = tuple(LabelSpace.from_datasets([config["data"]["dataset"]]).class_names[0])
        self.eval = dict(config.get("eval") or {})
        platform = jax.local_devices()[0].platform
        self.model = finetune.build_model(_Config(config), len(self.class_names), platform)
        self.step, state = checkpointing.restore_state(workdir, step)
        self.variables = evaluate.local_copy({"params": state["params"],
                                              "batch_stats": state["batch_stats"]})

    def predict(self, image_HxWx3: np.ndarray, *, short_side: int | None = None,
                mode: str = "whole", crop: Sequence[int] | None = None,
                stride: Sequence[int] | None = None, flip: bool = False) -> np.ndarray:
        """int [H, W] class indices at the image's own size."""
        h, w = image_HxWx3.shape[:2]
        resized, _ = resize_short_side(image_HxWx3, None, short_side)
        scores = _scorer(self.model, len(self.class_names), mode,
                         None if crop is None else tuple(crop), None if stride is None else tuple(stride),
                         bool(flip), (h, w))(self.variables, resized[None])
        return np.asarray(scores[0])


class _Config(dict):
    """A config.json dict with attribute access, as `finetune.build_model` reads it."""

    def __getattr__(self, key: str) -> Any:
        value = self[key]
        return _Config(value) if isinstance(value, dict) else value


@functools.lru_cache(maxsize=None)
def _scorer(model: Any, num_classes: int, mode: str, crop: tuple[int, ...] | None,
            stride: tuple[int, ...] | None, flip: bool, size: tuple[int, int]):
    apply_fn = evaluate.logits_fn(model)

    def run(variables, image_1xHxWx3):
        return evaluate.predict_labels(apply_fn, variables, image_1xHxWx3, num_classes, size, mode,
                                       crop, stride, flip)
    return jax.jit(run)


def list_images(paths: Sequence[str]) -> list[tuple[str, bool]]:
    """(file, found in a folder) for files as given and folders expanded to their images (sorted,
    recursive); errors name the path."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                           if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            out += [(f, True) for f in found]
        elif os.path.exists(path):
            out.append((path, False))
        else:
            raise FileNotFoundError(f"image or folder not found: {path}")
    return out


def _warn_skip(error: Exception) -> None:
    print(f"WARNING: {error}; skipped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    parser = exit_codes.ArgumentParser(
        prog="python -m ms3_jax.predict", description="Segment images with a fine-tuned ms3_jax workdir.")
    parser.add_argument("--workdir", required=True, help="fine-tuning workdir (configs/finetune/)")
    parser.add_argument("--image", nargs="+", required=True, help="image files and / or folders")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--short_side", type=int, default=None,
                        help="resize the short side first (default: the workdir's eval.short_side; 0: keep)")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None,
                        help="default: the workdir's eval.mode")
    parser.add_argument("--crop", type=int, nargs="+", default=None, help="slide window (h [w])")
    parser.add_argument("--stride", type=int, nargs="+", default=None, help="slide stride (h [w])")
    parser.add_argument("--flip", action="store_true", default=None, help="flip averaging")
    parser.add_argument("--verbose", action="store_true", help="full tracebacks for usage errors too")
    args = parser.parse_args(argv)
    with exit_codes.usage_errors(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> list[tuple[str, str]]:
    inputs = list_images(args.image)
    skipped = 0
    images = []
    for path, in_folder in inputs:  # all decoded before the model loads
        try:
            read_image(path)
        except (ValueError, OSError) as e:
            if not in_folder:
                raise
            _warn_skip(e)
            skipped += 1
            continue
        images.append(path)
    if not images:
        raise ValueError(f"no readable image: all {skipped} image(s) found in "
                         f"{', '.join(args.image)} were skipped (WARNING lines above)")
    stems = output_stems(images)
    safe.check_output_dir(args.out)
    check_outputs_spare_inputs(args.out, stems, images)
    seg = Segmentor(args.workdir, args.step)
    ev = seg.eval
    short = ev.get("short_side") if args.short_side is None else args.short_side
    mode = args.mode or ev.get("mode", "whole")
    crop, stride = args.crop or ev.get("crop"), args.stride or ev.get("stride")
    crop, stride = [None if v is None else (tuple(v) * 2)[:2] for v in (crop, stride)]
    if mode == "slide" and not (crop and stride):
        raise ValueError("--mode slide needs --crop and --stride (or the workdir's eval.crop / stride)")
    flip = bool(ev.get("flip", False) if args.flip is None else args.flip)
    in_folder = dict(inputs)
    written = []
    for path, stem in zip(images, stems):
        try:
            image = read_image(path)
        except (ValueError, OSError) as e:  # changed since it was checked
            if not in_folder[path]:
                raise
            _warn_skip(e)
            skipped += 1
            continue
        labels = seg.predict(image, short_side=short or None, mode=mode, crop=crop, stride=stride,
                             flip=flip)
        written.append(write_outputs(args.out, stem, image, labels, seg.class_names))
        share = np.bincount(labels.ravel(), minlength=len(seg.class_names)) / labels.size
        top = ", ".join(f"{seg.class_names[i]} {share[i]:.0%}" for i in np.argsort(-share)[:3])
        print(f"{path}: {top} -> {written[-1][1]}")
    if skipped:
        print(f"WARNING: skipped {skipped} unreadable image(s) of {len(inputs)}; segmented "
              f"{len(written)}", file=sys.stderr, flush=True)
    if not written:
        raise ValueError(f"no image could be segmented: all {skipped} were skipped")
    return written


if __name__ == "__main__":
    main()
