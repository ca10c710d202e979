"""Label maps as pictures: a fixed class palette, colour overlays with a legend (zero-shot
outputs) and captioned "image | ground truth | prediction" panels, enlarged to be read
(TensorBoard examples, the notebook). Host side: NumPy and Pillow."""
from __future__ import annotations

import collections
import colorsys
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ms3_jax.files import safe

# Distinct, legible colours for the first classes; more are spread over the hue circle.
_BASE_PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))
# `panel`: pixels outside the classes (ignored in the ground truth) and the panel's least height.
IGNORED_COLOUR = (40, 40, 40)
IGNORED_NAME = "(ignored)"
PANEL_MIN_HEIGHT = 256


def check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3] (RGB), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    return image


def palette(n: int) -> np.ndarray:
    """uint8 [n, 3] distinct colours (a fixed list, then golden-ratio hues)."""
    out = list(_BASE_PALETTE[:n])
    for i in range(len(out), n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.asarray(out, np.uint8).reshape(n, 3)


def overlay(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
            alpha: float = 0.5, font_size: int | None = None) -> Image.Image:
    """RGB image: class colours blended on `image` (weight `alpha`), a legend panel on the right
    listing every class name with its colour (the canvas grows if the legend is taller).
    `font_size` defaults to 1/30 of the image's short side, at least 12 px."""
    image = check_image(image)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the image {image.shape[:2]}")
    font_size = font_size or max(12, min(image.shape[:2]) // 30)
    colours = palette(len(class_names))
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours[labels].astype(np.float32)
    blended_im = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))
    font = _font(font_size)
    pad, box, row = 6, font_size, font_size + 4
    measure = ImageDraw.Draw(blended_im)
    text_w = max(int(measure.textlength(n, font=font)) for n in class_names)
    legend_w = pad + box + pad + text_w + pad
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w + legend_w, max(h, pad + row * len(class_names) + pad)), "white")
    canvas.paste(blended_im, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(class_names):
        y = pad + i * row
        draw.rectangle([w + pad, y, w + pad + box - 1, y + box - 1], fill=tuple(colours[i].tolist()),
                       outline=(0, 0, 0))
        draw.text((w + 2 * pad + box, y), name, fill=(0, 0, 0), font=font)
    return canvas


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def upscale_factor(height: int, min_height: int = PANEL_MIN_HEIGHT) -> int:
    """The least integer factor that makes `height` at least `min_height` (1: large enough)."""
    return max(1, -(-int(min_height) // max(int(height), 1)))


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer `factor` (each pixel a factor x factor block):
    label edges stay sharp, no colour is invented."""
    if factor <= 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def blend(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3]: the colour of each pixel's class (`palette`) blended on `image` (weight
    `alpha`); labels outside [0, num_classes) (ignored) in IGNORED_COLOUR."""
    image = check_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the image {image.shape[:2]}")
    colours = np.concatenate([palette(num_classes), np.asarray([IGNORED_COLOUR], np.uint8)])
    index = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    out = (1 - alpha) * image.astype(np.float32) + alpha * colours[index].astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def panel(image: np.ndarray, label_maps: Sequence[tuple[str, np.ndarray]],
          class_names: Sequence[str], *, title: str = "", min_height: int = PANEL_MIN_HEIGHT,
          alpha: float = 0.5, max_legend: int = 24,
          ignored_name: str = IGNORED_NAME) -> np.ndarray:
    """uint8 [H, W, 3]: a title line, then `image` and each label map of `label_maps`
    ((caption, int [h, w]) pairs, e.g. ("ground truth", y), ("prediction", p)) blended on it,
    side by side, each under its caption ("image | ground truth | prediction"), and one legend
    on the right (class colour and name). Every tile is enlarged by the same integer factor
    (nearest neighbour) to at least `min_height` pixels tall, so 48-96 px synthetic images can
    be read; the text size follows the enlarged tiles. Labels outside [0, len(class_names)) are
    drawn as ignored (IGNORED_COLOUR, named `ignored_name` when present). The legend lists every
    class when there are at most `max_legend`, else only the classes present in the maps."""
    image = check_image(image)
    h, w = image.shape[:2]
    k = len(class_names)
    maps = [(caption, np.asarray(labels)) for caption, labels in label_maps]
    tiles = [("image", image)] + [(c, blend(image, y, k, alpha)) for c, y in maps]
    factor = upscale_factor(h, min_height)
    tiles = [(c, upscale(t, factor)) for c, t in tiles]
    th, tw = h * factor, w * factor
    font_size = int(np.clip(th // 16, 14, 28))
    font = _font(font_size)
    pad, row = max(4, font_size // 3), font_size + max(4, font_size // 3)
    present = np.zeros(k + 1, bool)  # + ignored
    for _, y in maps:
        index = np.where((y >= 0) & (y < k), y, k)
        present[np.unique(index)] = True
    shown = list(range(k)) if k <= max_legend else [int(i) for i in np.flatnonzero(present[:k])]
    colours = palette(k)
    entries = [(class_names[i], tuple(int(v) for v in colours[i])) for i in shown]
    if present[k]:
        entries.append((ignored_name, IGNORED_COLOUR))
    if k > max_legend:
        entries.insert(0, (f"classes present ({len(shown)} of {k}):", None))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str) -> int:
        return int(measure.textlength(text, font=font)) if text else 0

    box = font_size
    legend_w = (pad + box + pad + max(text_w(n) for n, _ in entries) + pad) if entries else 0
    title_h = row + pad if title else 0
    caption_h = row
    tiles_w = len(tiles) * tw + (len(tiles) + 1) * pad
    width = max(tiles_w + legend_w, text_w(title) + 2 * pad)
    height = title_h + caption_h + max(th, row * len(entries)) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for i, (caption, tile) in enumerate(tiles):
        x = pad + i * (tw + pad)
        # The caption centred over its tile, cut to the tile's width.
        while text_w(caption) > tw and len(caption) > 4:
            caption = caption[:-4] + "..."
        draw.text((x + max(0, (tw - text_w(caption)) // 2), title_h + (row - font_size) // 2),
                  caption, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(tile), (x, title_h + caption_h))
    x0, y0 = tiles_w, title_h + caption_h
    for i, (name, colour) in enumerate(entries):
        y = y0 + i * row
        if colour is not None:
            draw.rectangle([x0 + pad, y, x0 + pad + box - 1, y + box - 1], fill=colour,
                           outline=(0, 0, 0))
            draw.text((x0 + 2 * pad + box, y), name, fill=(0, 0, 0), font=font)
        else:
            draw.text((x0 + pad, y), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def output_stems(paths: Sequence[str]) -> list[str]:
    """One output stem per input (`<stem>_labels.png`, `_labels.json`, `_overlay.png`), unique
    even on a case-insensitive file system: the file's stem, or, when several inputs share it
    (`a.png a.jpg sub/a.png`), the first keeps it and the others get their extension
    (`a_jpg`), then a number (`a_png_2`). Inputs renamed so are logged on stderr."""
    plain = [os.path.splitext(os.path.basename(p))[0] or "image" for p in paths]
    count = collections.Counter(s.lower() for s in plain)
    used = {s.lower() for s in plain if count[s.lower()] == 1}  # kept as they are
    stems = []
    for path, stem in zip(paths, plain):
        if count[stem.lower()] > 1:
            ext = os.path.splitext(path)[1].lstrip(".") or "noext"
            candidates = [stem, f"{stem}_{ext}"] + [f"{stem}_{ext}_{n}" for n in range(2, len(paths) + 2)]
            unique = next(c for c in candidates if c.lower() not in used)
            if unique != stem:
                print(f"note: {path} would share the output name {stem}_* with another input: "
                      f"written as {unique}_*", file=sys.stderr)
            stem = unique
        used.add(stem.lower())
        stems.append(stem)
    return stems


def output_paths(out_dir: str, stem: str) -> tuple[str, str, str]:
    """(labels PNG, labels JSON, overlay PNG) of `stem` in `out_dir`."""
    return (os.path.join(out_dir, f"{stem}_labels.png"), os.path.join(out_dir, f"{stem}_labels.json"),
            os.path.join(out_dir, f"{stem}_overlay.png"))


def check_outputs_spare_inputs(out_dir: str, stems: Sequence[str], inputs: Sequence[str]) -> None:
    """ValueError if an output file would overwrite one of the inputs (`--out` = the input
    folder, run twice)."""
    sources = {os.path.realpath(p): p for p in inputs}
    for stem in stems:
        for out in output_paths(out_dir, stem):
            if os.path.realpath(out) in sources:
                raise ValueError(f"the output {out} would overwrite the input "
                                 f"{sources[os.path.realpath(out)]}; choose another --out")


def write_outputs(out_dir: str, stem: str, image: np.ndarray, labels: np.ndarray,
                  class_names: Sequence[str]) -> tuple[str, str]:
    """`<stem>_labels.png` (palette PNG: pixel value = class index, shown in the overlay's
    colours), `<stem>_labels.json` (index -> class name) and `<stem>_overlay.png`
    (`visualize.overlay`), each written atomically (`safe.atomic_output`: whole or not at all);
    returns the two PNG paths."""
    if len(class_names) > 256:
        raise ValueError(f"{len(class_names)} classes do not fit a uint8 label PNG (at most 256)")
    os.makedirs(out_dir, exist_ok=True)
    labels_path, json_path, overlay_path = output_paths(out_dir, stem)
    indexed = Image.fromarray(labels.astype(np.uint8), mode="P")
    indexed.putpalette(palette(len(class_names)).astype(np.uint8).ravel().tolist())
    picture = overlay(image, labels, class_names)
    with safe.atomic_output(labels_path, "wb") as f:
        indexed.save(f, format="PNG")
    with safe.atomic_output(json_path, "w") as f:
        json.dump({str(i): name for i, name in enumerate(class_names)}, f, indent=1)
    with safe.atomic_output(overlay_path, "wb") as f:
        picture.save(f, format="PNG")
    return labels_path, overlay_path
