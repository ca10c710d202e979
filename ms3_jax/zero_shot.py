"""Zero-shot segmentation with arbitrary class names (paper Fig. 3).

The language head's pixel embeddings I (unit norm, [H/4, W/4, C]) are compared with the text
embeddings T of any class names (stage-1 adapted text tower and context); the cosine logits
I T^T are upsampled to the image and the argmax is the label (Eq. 1's pairing, no classifier).

  python -m ms3_jax.zero_shot --workdir W --image a.jpg b.png --classes "sky,grass" --out DIR

Workdirs and outputs: docs/usage.md, "Zero-shot segmentation".

Bad input is a one-line `error: ...` on stderr and exit code 2 (`--verbose`: the traceback),
found before the model loads: every image is opened and fully decoded first (`read_image`: a
missing, empty, truncated or non-image file, a directory, a decompression bomb), the output
directory is checked for writing (`safe.check_output_dir`). Non-8-bit images are converted,
not clipped (`images.to_rgb_uint8`). Inputs whose outputs would share a name (`a.png a.jpg
sub/a.png`) are disambiguated (`visualize.output_stems`: `a_*`, `a_jpg_*`, `a_png_*`), the
mapping logged; every output file is written atomically (`visualize.write_outputs`). The same
rules hold for `ms3_jax.predict`; `exit_codes.usage_errors` reports the errors of all the CLIs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ms3_jax.data import sources
from ms3_jax.data.images import read_image
from ms3_jax.engine import checkpointing, config_paths, exit_codes
from ms3_jax.files import safe
from ms3_jax.method import adapted_text, text_embeddings
from ms3_jax.evaluation.visualize import (check_image, check_outputs_spare_inputs, output_stems,
                                          write_outputs)
from ms3_jax.models import clip_text, clip_vision
from ms3_jax.models.clip_text import CLIPTextTower
from ms3_jax.models.deeplab import MS3Encoder, encoder_from_config, resize_bilinear

DEFAULT_SHORT_SIDE = 448
TEXT_MODEL_META = os.path.join(adapted_text.TEXT_MODEL_DIR, adapted_text.TEXT_MODEL_META)
STAGE1_HINT = ("make one with stage 1: python -m ms3_jax.main --config=configs/text_adapt.py "
               "--workdir=T (the same datasets and model as pretraining), then pass "
               "text_workdir=T (CLI: --text_workdir T)")


def check_classes(class_names: Sequence[str] | str) -> tuple[str, ...]:
    """Stripped class names; ValueError on an empty list, empty names or duplicates (CLIP
    lowercases, so 'Sky' and 'sky ' are the same prompt). A string is split at commas."""
    if isinstance(class_names, str):
        class_names = class_names.split(",")
    names = tuple(str(n).strip() for n in class_names)
    if not names or names == ("",):
        raise ValueError("the class list is empty: give at least one class name, e.g. 'sky,grass'")
    return clip_text.check_class_names(names)


def input_size(height: int, width: int, short_side: int | None, multiple: int) -> tuple[int, int]:
    """Network input size: short side scaled to `short_side` (None: keep), both sides rounded to a
    multiple of `multiple` (the output stride) so the H/4 embedding grid tiles the image exactly."""
    scale = 1.0 if short_side is None else short_side / min(height, width)
    return (max(multiple, int(round(height * scale / multiple)) * multiple),
            max(multiple, int(round(width * scale / multiple)) * multiple))


def _has_text_model(directory: str | None) -> bool:
    return bool(directory) and os.path.isfile(os.path.join(directory, TEXT_MODEL_META))


def resolve_workdirs(workdir: str | os.PathLike,
                     text_workdir: str | os.PathLike | None = None) -> tuple[str, str, dict[str, Any]]:
    """(image-encoder workdir, stage-1 text workdir, its config) for a pretraining, demo or
    stage-1 workdir. Errors name the missing path and how to make it."""
    workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir not found: {workdir}")
    config_file = checkpointing.CONFIG_FILE
    demo_pretrain = os.path.join(workdir, "pretrain")
    if (not os.path.isfile(os.path.join(workdir, config_file))
            and os.path.isfile(os.path.join(demo_pretrain, config_file))):  # demo workdir
        image_dir, default_text = demo_pretrain, os.path.join(workdir, "text_adapt")
        why = f"looked in the demo's stage-1 workdir {default_text}"
        config = checkpointing.read_config(image_dir)
    else:
        image_dir = workdir
        config = checkpointing.read_config(image_dir)  # FileNotFoundError naming config.json
        if config.get("mode") == "finetune":
            init = (config.get("init") or {}).get("path") or "its MS3 pretraining workdir"
            raise ValueError(
                f"{image_dir} is a fine-tuning workdir: its segmentor predicts the classes of "
                f"{(config.get('data') or {}).get('dataset')!r} only (python -m ms3_jax.predict "
                f"--workdir {image_dir} --image ...). Zero-shot with any class names needs the "
                f"language head of a pretraining workdir, e.g. {init}")
        embeddings = (config.get("text") or {}).get("embeddings") or ""
        if config.get("mode") == "text_adapt":
            default_text, why = image_dir, "looked in this stage-1 workdir"
        elif embeddings and embeddings != text_embeddings.TEMPLATE:
            if not os.path.isabs(embeddings) and not os.path.exists(embeddings):
                embeddings = os.path.join(image_dir, embeddings)
            default_text = os.path.dirname(os.path.abspath(embeddings))
            why = f"looked next to its text.embeddings {embeddings}"
        else:
            default_text = None
            why = f"its text.embeddings is {embeddings!r}: T came from CLIP's hand template"
    ckpt_dir = os.path.join(image_dir, checkpointing.CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise FileNotFoundError(f"no checkpoints in {image_dir}: {ckpt_dir} is missing or empty "
                                "(train it first: python -m ms3_jax.main --config=configs/pretrain.py "
                                f"--workdir={image_dir})")
    if text_workdir is not None:
        text_dir = os.path.abspath(os.path.expanduser(os.fspath(text_workdir)))
        if not _has_text_model(text_dir):
            raise FileNotFoundError(
                f"text_workdir {text_dir} has no stage-1 text model "
                f"({os.path.join(text_dir, TEXT_MODEL_META)} is missing); {STAGE1_HINT}")
        return image_dir, text_dir, config
    if not _has_text_model(default_text):
        if default_text:
            why += f": {os.path.join(default_text, TEXT_MODEL_META)} is missing"
        raise FileNotFoundError(f"workdir {image_dir} has no stage-1 text model ({why}); {STAGE1_HINT}")
    return image_dir, default_text, config


@dataclasses.dataclass
class ZeroShotSegmenter:
    """Image encoder (language head, or CLIP's dense patch embeddings of a stage-1 workdir) +
    adapted text tower; `segment(image, names)`."""

    model: MS3Encoder | clip_vision.PixelEncoder
    variables: Any
    text_module: CLIPTextTower
    text_params: Any
    tokenizer: Any
    ctx: jax.Array
    short_side: int | None = DEFAULT_SHORT_SIDE
    workdir: str = ""
    text_workdir: str = ""

    def __post_init__(self):
        self._forward = jax.jit(lambda v, x: self.model.apply(v, x, train=False)["language"])
        self._class_cache: dict[tuple[str, ...], np.ndarray] = {}

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, text_workdir: str | os.PathLike | None = None,
                     *, short_side: int | None = DEFAULT_SHORT_SIDE, ema: bool = False,
                     step: int | None = None) -> "ZeroShotSegmenter":
        """Load the latest (or `step`) checkpoint's encoder (`ema`: the momentum encoder) and the
        stage-1 text model (default: the one the workdir was trained with, see `resolve_workdirs`)."""
        image_dir, text_dir, config = resolve_workdirs(workdir, text_workdir)
        stage1 = config.get("mode") == "text_adapt"
        if stage1 and ema:
            raise ValueError(f"{image_dir} is a stage-1 workdir: it has no momentum encoder")
        text_module, text_params, tokenizer, ctx = adapted_text.load_adapted_text(text_dir)
        _, state = checkpointing.restore_state(image_dir, step)
        device = jax.local_devices()[0]
        clip_encoder = adapted_text.load_image_encoder(image_dir) if stage1 else None
        if clip_encoder is not None:  # stage 1 with CLIP's image tower: its dense embeddings
            variables = jax.device_put({"params": state["params"]["image"],
                                        "batch_stats": state.get("batch_stats") or {}}, device)
            return cls(clip_encoder, variables, text_module, text_params, tokenizer, ctx,
                       short_side=short_side, workdir=image_dir, text_workdir=text_dir)
        if stage1:  # params {'image': encoder, 'ctx': [M, width]}
            variables = {"params": state["params"]["image"], "batch_stats": state["batch_stats"]}
        else:
            variables = checkpointing.encoder_variables(state, ema=ema)
        if "proj_language" not in variables["params"]:
            kind = (config.get("loss") or {}).get("kind")
            raise ValueError(f"the encoder in {image_dir} has no language head (loss.kind={kind!r}); "
                             "zero-shot prediction needs an MS3-pretrained (or stage-1) encoder")
        model_cfg = config["model"]
        proj = text_module.config.proj_dim
        if model_cfg.get("emb_dim") != proj:
            raise ValueError(f"model.emb_dim={model_cfg.get('emb_dim')} of {image_dir} does not match "
                             f"the projection dim {proj} of the text model in {text_dir}")
        model = encoder_from_config(model_cfg, device.platform, heads=("language",),
                                    num_classes=None)
        keep = ("backbone", "decode_head", "proj_language")  # drop the visual head
        variables = jax.device_put({col: {k: v for k, v in tree.items() if k in keep}
                                    for col, tree in variables.items()}, device)
        return cls(model, variables, text_module, text_params, tokenizer, ctx,
                   short_side=short_side, workdir=image_dir, text_workdir=text_dir)

    @property
    def multiple(self) -> int:
        return int(self.model.output_stride)

    def embed_classes(self, class_names: Sequence[str] | str) -> np.ndarray:
        """T [K, C] float32, unit rows: the names in the learned-context prompt (Sec. 3.2)."""
        names = check_classes(class_names)
        if names not in self._class_cache:
            t_KxC = clip_text.encode_classes(self.text_module, self.text_params, self.tokenizer,
                                             names, ctx=self.ctx)
            self._class_cache[names] = np.asarray(t_KxC, np.float32)
        return self._class_cache[names]

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """The network input: uint8 [h, w, 3] at `input_size` (bilinear, antialiased)."""
        image = check_image(image)
        h, w = input_size(*image.shape[:2], self.short_side, self.multiple)
        if (h, w) == image.shape[:2]:
            return image
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def pixel_embeddings(self, image: np.ndarray) -> np.ndarray:
        """The language head's I [h/4, w/4, C] float32 (unit norm) of the preprocessed image."""
        x = self.preprocess(image)
        return np.asarray(self._forward(self.variables, jnp.asarray(x)[None])[0], np.float32)

    def segment(self, image: np.ndarray, class_names: Sequence[str] | str
                ) -> tuple[np.ndarray, np.ndarray]:
        """(labels int32 [H, W] indexing `class_names`, scores float32 [H, W, K]): cosine of the
        pixel and class embeddings, bilinearly upsampled to the image size, and its argmax."""
        t_KxC = self.embed_classes(class_names)
        image = check_image(image)
        emb_hxwxC = self.pixel_embeddings(image)
        scores_HxWxK = np.asarray(upsampled_cosine(jnp.asarray(emb_hxwxC), jnp.asarray(t_KxC),
                                                   tuple(image.shape[:2])))
        return np.argmax(scores_HxWxK, axis=-1).astype(np.int32), scores_HxWxK


@functools.partial(jax.jit, static_argnums=2)
def upsampled_cosine(emb_hxwxC: jax.Array, text_KxC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Cosines [H, W, K] of unit pixel and class embeddings, bilinearly upsampled to `size`."""
    logits_hxwxK = jnp.einsum("hwc,kc->hwk", emb_hxwxC, text_KxC,
                              precision=jax.lax.Precision.HIGHEST)
    return resize_bilinear(logits_hxwxK[None], size)[0]


def demo_config(arg: str | None = "quick"):
    """`configs/demo.py:<arg>` of the checkout or the installed package (loaded by path, as the
    configs load each other)."""
    path = config_paths.find_config(os.path.join("configs", "demo.py"))
    if path is None:
        raise FileNotFoundError("configs/demo.py not found in the checkout or the installed package")
    spec = importlib.util.spec_from_file_location("_ms3_configs_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def synthetic_sample(workdir: str, dataset: str = "synth_a", index: int = 0,
                     split: str = "validation") -> np.ndarray:
    """One image (uint8 [H, W, 3]) of a synthetic dataset built by the demo into `workdir`/data
    (the pretraining config's `data.data_dir` when `workdir` is a pretraining workdir)."""
    data_dir = os.path.join(workdir, "data")
    if not os.path.isdir(data_dir):
        data_dir = checkpointing.read_config(workdir)["data"]["data_dir"]
    source = sources.open_sources([dataset], split, data_dir)[0]
    return np.asarray(source[index]["image"], np.uint8)


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    parser = exit_codes.ArgumentParser(
        prog="python -m ms3_jax.zero_shot",
        description="Zero-shot segmentation with arbitrary class names (MS3 paper, Fig. 3).")
    parser.add_argument("--workdir", required=True,
                        help="pretraining workdir (config.json + checkpoints), demo or stage-1 workdir")
    parser.add_argument("--text_workdir", default=None,
                        help="stage-1 workdir with text_model/ (default: the one of --workdir)")
    parser.add_argument("--image", nargs="+", required=True, help="image file(s)")
    parser.add_argument("--classes", required=True, help='comma-separated names, "cat,dog,grass"')
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--short_side", type=int, default=DEFAULT_SHORT_SIDE,
                        help="resize the short side to this before encoding (0: keep the size)")
    parser.add_argument("--ema", action="store_true", help="use the momentum encoder")
    parser.add_argument("--verbose", action="store_true", help="full tracebacks for usage errors too")
    args = parser.parse_args(argv)
    with exit_codes.usage_errors(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> list[tuple[str, str]]:
    names = check_classes(args.classes)  # fail on bad input before loading anything:
    for path in args.image:
        read_image(path)  # every image opened and fully decoded
    stems = output_stems(args.image)
    safe.check_output_dir(args.out)
    check_outputs_spare_inputs(args.out, stems, args.image)
    segmenter = ZeroShotSegmenter.from_workdir(args.workdir, args.text_workdir,
                                               short_side=args.short_side or None, ema=args.ema)
    written = []
    for path, stem in zip(args.image, stems):
        image = read_image(path)
        labels, _ = segmenter.segment(image, names)
        written.append(write_outputs(args.out, stem, image, labels, names))
        counts = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
        share = ", ".join(f"{n} {c:.0%}" for n, c in zip(names, counts))
        print(f"{path}: {share} -> {written[-1][1]}")
    return written


if __name__ == "__main__":
    main()
