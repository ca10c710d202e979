"""Training augmentation, PIL / numpy (4.1: "random crop, color distortion, and Gaussian blur").

`AugmentConfig` fields: docs/choices.md, "Random scale before the crop", "Colour distortion
and blur: MoCo v2 settings".
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ms3_jax.data.label_space import IGNORE_INDEX

MEAN_PIXEL = (124, 116, 104)  # ImageNet mean (123.675, 116.28, 103.53), rounded


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (module docstring)."""
    crop_size: int | tuple[int, int] = 224  # square, or (height, width) e.g. Cityscapes (512, 1024)
    scale_range: tuple[float, float] = (0.5, 2.0)
    # Short side before the random scale: an int, 'auto' (= crop_size / 0.875, i.e. 256 for 224)
    # or 'original' (scale the image's own size).
    base_size: int | str = 'auto'
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    pad_value: tuple[int, int, int] = MEAN_PIXEL

    @classmethod
    def geometric_only(cls, **kwargs) -> AugmentConfig:
        """Scale, crop and flip only (no photometric changes): for alignment tests and debugging."""
        return cls(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, **kwargs)

    @property
    def crop_hw(self) -> tuple[int, int]:
        c = self.crop_size
        return (int(c), int(c)) if isinstance(c, (int, np.integer)) else (int(c[0]), int(c[1]))


def _base_size(cfg: AugmentConfig) -> int:
    if cfg.base_size == 'auto':
        return int(round(min(cfg.crop_hw) / 0.875))
    if isinstance(cfg.base_size, str) or cfg.base_size <= 0:
        raise ValueError(f"base_size must be a positive int, 'auto' or 'original', not "
                         f'{cfg.base_size!r}.')
    return int(cfg.base_size)


def _color_jitter(img: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image.Image:
    """torchvision ColorJitter semantics (PIL backend): the four jitters in a random order."""
    factors = [rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
               rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
               rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
               rng.uniform(-cfg.hue, cfg.hue)]
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for op in rng.permutation(4):
        f = factors[op]
        if op < 3:
            img = enhancers[op](img).enhance(f)
        elif abs(f) > 1e-6:
            hsv = np.array(img.convert('HSV'))
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(f * 255))) % 256
            img = Image.fromarray(hsv, 'HSV').convert('RGB')
    return img


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random scale + crop (pad) + flip + colour distortion + blur.

    Args:
      image: uint8 [H, W, 3]. label: uint8 [H, W] (local ids, 255 = ignore).
    Returns: image uint8 [ch, cw, 3], label uint8 [ch, cw] with (ch, cw) = cfg.crop_hw.
    """
    h, w = label.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f'Image {image.shape} and label {label.shape} sizes differ.')
    crop_h, crop_w = cfg.crop_hw
    s = rng.uniform(*cfg.scale_range)
    ratio = s if cfg.base_size == 'original' else s * _base_size(cfg) / min(h, w)
    nh, nw = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
    img, lab = Image.fromarray(image), Image.fromarray(label)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BILINEAR)
        lab = lab.resize((nw, nh), Image.NEAREST)
    ch, cw = min(crop_h, nh), min(crop_w, nw)
    y0 = int(rng.integers(0, nh - ch + 1))
    x0 = int(rng.integers(0, nw - cw + 1))
    box = (x0, y0, x0 + cw, y0 + ch)
    img, lab = img.crop(box), lab.crop(box)
    if rng.random() < cfg.flip_prob:
        img, lab = img.transpose(Image.FLIP_LEFT_RIGHT), lab.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < cfg.color_jitter_prob:
        img = _color_jitter(img, rng, cfg)
    if rng.random() < cfg.grayscale_prob:
        img = img.convert('L').convert('RGB')
    if rng.random() < cfg.blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*cfg.blur_sigma)))
    out_img = np.full((crop_h, crop_w, 3), np.asarray(cfg.pad_value, np.uint8), np.uint8)
    out_img[:ch, :cw] = np.asarray(img)
    out_lab = np.full((crop_h, crop_w), IGNORE_INDEX, np.uint8)
    out_lab[:ch, :cw] = np.asarray(lab)
    return out_img, out_lab
