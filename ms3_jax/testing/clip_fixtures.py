"""Tiny random CLIP checkpoints for tests: a thin wrapper over ``ms3_jax.demo.tiny_clip``.

``save_tiny_clip(dir, full=...)`` writes a width-32, 2-layer model with a 16-d projection and a
BPE vocabulary covering ``TINY_WORDS`` (max_len 24). Import as ``from ms3_jax.testing.clip_fixtures import ...``.
"""

from __future__ import annotations

import os
from pathlib import Path

import transformers

from ms3_jax.demo import tiny_clip

TINY_WORDS = (
    "a", "photo", "of", "cat", "dog", "horse", "cow", "person", "sky", "car", "traffic", "light",
    "potted", "plant", "tree", "road",
)
TINY_MAX_LEN = 24
TINY_WIDTH = 32
TINY_PROJ_DIM = 16


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    return tiny_clip.vocab_and_merges(TINY_WORDS)


def write_tiny_tokenizer(directory: str | os.PathLike) -> int:
    return tiny_clip.write_tokenizer(directory, TINY_WORDS)


def tiny_text_config(legacy_eos: bool = False, **overrides):
    return tiny_clip.text_config(TINY_WORDS, max_len=TINY_MAX_LEN, width=TINY_WIDTH,
                                 proj_dim=TINY_PROJ_DIM, legacy_eos=legacy_eos, **overrides)


def save_tiny_clip(
    directory: str | os.PathLike, *, full: bool = False, legacy_eos: bool = False, seed: int = 0
) -> Path:
    """A random ``CLIPTextModelWithProjection`` (or full ``CLIPModel``) with sharpened weights."""
    return tiny_clip.save_tiny_clip(directory, TINY_WORDS, full=full, seed=seed,
                                    max_len=TINY_MAX_LEN, width=TINY_WIDTH,
                                    proj_dim=TINY_PROJ_DIM, legacy_eos=legacy_eos)


def load_hf_text_model(directory: str | os.PathLike, full: bool = False):
    """The transformers reference model for a tiny checkpoint (eager attention, eval mode)."""
    cls = transformers.CLIPModel if full else transformers.CLIPTextModelWithProjection
    return cls.from_pretrained(directory, attn_implementation="eager").eval()
