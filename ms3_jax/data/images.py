"""Reading a user's image for inference (zero-shot, predict): opened and fully decoded before any
model loads, any bit depth converted without clipping, one-line errors naming the file."""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def to_rgb_uint8(im: Image.Image, path: str = "image") -> np.ndarray:
    """RGB uint8 [H, W, 3] of a PIL image of any mode, without clipping: 16-bit / 32-bit integer
    grey (I;16, I;16B, I;16L, I, from 16-bit PNGs and TIFFs) is scaled 0..65535 -> 0..255
    (v / 257, rounded: a 16-bit image made as an 8-bit one * 257 gives the same pixels); floating
    point (F) is refused (its value range is unknown); every other mode (L, P, LA, RGBA, CMYK,
    YCbCr, 1, ...) goes through PIL's `convert('RGB')`. 16-bit RGB PNGs reach here as RGB already
    (PIL keeps their high bytes)."""
    if im.mode == "RGB":
        return np.asarray(im, np.uint8)
    if im.mode == "F":
        raise ValueError(f"cannot read image {path}: floating-point pixels (PIL mode F) have no "
                         "known range; save it as an 8- or 16-bit image")
    if im.mode.startswith("I"):
        grey = np.asarray(im).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"cannot read image {path}: integer pixels (PIL mode {im.mode}) "
                             f"range {grey.min()}..{grey.max()}, outside 0..65535 (16 bits)")
        grey = ((2 * grey + 257) // 514).astype(np.uint8)  # round(v / 257), exact
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3] (EXIF orientation applied, `to_rgb_uint8`), the file opened and fully
    decoded. One-line errors naming the path and the reason: FileNotFoundError (missing),
    IsADirectoryError, ValueError (not a regular file, empty, not an image, truncated or
    corrupt, a decompression bomb -- PIL's DecompressionBombWarning counts as an error too)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot read image {path}: it is a directory, not an image file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"cannot read image {path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read image {path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode everything now: a truncated file fails here, not later
                im = ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot read image {path}: refused as a possible decompression bomb "
                         f"({e})") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"cannot read image {path}: not an image file PIL can read "
                         "(unknown format, or the header is damaged)") from e
    except Exception as e:  # the file's bytes are input: PIL raises OSError, SyntaxError, ...
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return to_rgb_uint8(im, path)
