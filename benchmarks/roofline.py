"""Roofline estimates of a compiled step: FLOP time, byte time and the paper run's hours.

A step needs at least max(FLOPs / peak FLOP/s, bytes / peak HBM bandwidth) on a chip: the
compute floor is the first term, the byte time the second; their max is the roofline estimate.
Peaks are the vendors' dense bfloat16 figures and HBM bandwidths (spec sheets, per chip); real
steps reach a fraction of them, so the estimate is a lower bound on the step time, not a forecast.
Used by benchmarks/accelerators.py (AOT, per target) and benchmarks/device_time.py (on a chip).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    flops: float  # dense bfloat16 FLOP/s
    bandwidth: float  # HBM bytes/s
    hbm: float  # bytes
    kinds: tuple[str, ...]  # substrings of `jax.Device.device_kind` naming this chip


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1228e9, 32 * 2**30, ("TPU v4",)),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * 2**30, ("TPU v5 lite", "TPU v5e")),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * 2**30, ("TPU v5p", "TPU v5")),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * 2**30, ("TPU v6 lite", "TPU v6e")),
    "h100": Chip("H100 SXM", 989e12, 3.35e12, 80e9, ("H100",)),
    "a100": Chip("A100 SXM 80GB", 312e12, 2.039e12, 80e9, ("A100",)),
}

# The paper's pretraining (Sect. 4.1): 100 epochs of VOC-aug + ADE20K + COCO-Stuff-164k
# (10582 + 20210 + 118287 images) at batch 128 on 8 chips.
PAPER_IMAGES_PER_EPOCH = 149_079
PAPER_EPOCHS = 100
STAGE1_EPOCHS = 10  # configs/text_adapt.py
PAPER_CHIPS = 8


def chip_of(device_kind: str) -> str | None:
    """The `CHIPS` key of a device's `device_kind` (None: no peaks known, e.g. a CPU)."""
    for key, chip in CHIPS.items():  # v5e / v6e before the bare "TPU v5" of v5p
        if any(k.lower() in device_kind.lower() for k in chip.kinds):
            return key
    return None


@dataclasses.dataclass(frozen=True)
class Estimate:
    flop_s: float  # compute floor, seconds per step
    byte_s: float  # HBM traffic at peak bandwidth, seconds per step
    images: int  # per chip per step

    @property
    def step_s(self) -> float:
        return max(self.flop_s, self.byte_s)

    @property
    def over_floor(self) -> float:
        """Roofline time / compute floor (1: compute-bound)."""
        return self.step_s / self.flop_s

    @property
    def images_per_s(self) -> float:
        return self.images / self.step_s

    def run_hours(self, epochs: int = PAPER_EPOCHS, chips: int = PAPER_CHIPS) -> float:
        """Wall hours of `epochs` over the paper's union (149,079 images) on `chips` chips at this
        per-chip rate (data parallel; the gradient all-reduce not counted). Chip-hours: x chips."""
        return epochs * PAPER_IMAGES_PER_EPOCH / (self.images_per_s * chips) / 3600


def estimate(flops: float, bytes_moved: float, chip: str, images: int) -> Estimate:
    c = CHIPS[chip]
    return Estimate(flops / c.flops, bytes_moved / c.bandwidth, images)


def peaks_line(chips: list[str]) -> str:
    """One line naming the peaks used, for every table that uses them."""
    return "peaks: " + "; ".join(
        f"{CHIPS[c].name} {CHIPS[c].flops / 1e12:.0f} TFLOP/s bf16, {CHIPS[c].bandwidth / 1e9:.0f} GB/s"
        for c in chips)
