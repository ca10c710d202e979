"""Tiny random CLIP checkpoints in Hugging Face format, for tests (no network).

``save_tiny_clip(dir, full=...)`` writes what a hub snapshot of a CLIP model holds (config.json,
model.safetensors, vocab.json, merges.txt) for a width-32, 2-layer model and a ~100-token BPE
vocabulary covering ``TINY_WORDS``. Import from test modules as ``from tests.clip_fixtures import ...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_WORDS = (
    "a", "photo", "of", "cat", "dog", "horse", "cow", "person", "sky", "car", "traffic", "light",
    "potted", "plant", "tree", "road",
)
TINY_MAX_LEN = 24
TINY_WIDTH = 32
TINY_PROJ_DIM = 16


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP-style BPE vocab (``</w>`` word ends) with SOS/EOS as the two largest ids, like CLIP's."""
    chars = "abcdefghijklmnopqrstuvwxyz."
    vocab: dict[str, int] = {}
    for token in list(chars) + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges: list[str] = []
    for word in TINY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: "p h" -> "ph", "ph o" -> "pho", ...
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tiny_tokenizer(directory: str | os.PathLike) -> int:
    """Write vocab.json + merges.txt (the files of a CLIP hub checkpoint); returns the vocab size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tiny_text_config(legacy_eos: bool = False, **overrides):
    """A transformers ``CLIPTextConfig`` matching the tiny tokenizer (eos 2 = legacy argmax pooling)."""
    import transformers

    vocab, _ = tiny_vocab_and_merges()
    kwargs = dict(
        vocab_size=len(vocab), hidden_size=TINY_WIDTH, intermediate_size=2 * TINY_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TINY_MAX_LEN,
        projection_dim=TINY_PROJ_DIM, hidden_act="quick_gelu",
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=2 if legacy_eos else vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    kwargs.update(overrides)
    return transformers.CLIPTextConfig(**kwargs)


def save_tiny_clip(
    directory: str | os.PathLike, *, full: bool = False, legacy_eos: bool = False, seed: int = 0
) -> Path:
    """Save a random ``CLIPTextModelWithProjection`` (or a full ``CLIPModel`` if ``full``) + tokenizer."""
    import torch
    import transformers

    directory = Path(directory)
    torch.manual_seed(seed)
    text_config = tiny_text_config(legacy_eos=legacy_eos)
    if full:
        vision_config = transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=16, projection_dim=TINY_PROJ_DIM,
        )
        config = transformers.CLIPConfig(
            text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
            projection_dim=TINY_PROJ_DIM,
        )
        model = transformers.CLIPModel(config)
    else:
        model = transformers.CLIPTextModelWithProjection(text_config)
    _sharpen(model)
    model.save_pretrained(directory, safe_serialization=True)
    write_tiny_tokenizer(directory)
    return directory


def _sharpen(model) -> None:
    """Larger random weights than CLIP's init, so attention is far from uniform and any mismatch
    (mask, pooling index, activation, LayerNorm placement) shows up in parity tests."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # layer_norm1/2, final_layer_norm, pre_layrnorm, post_layernorm
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
            elif "embedding" in name:
                param.normal_(0.0, 0.5)
            elif param.ndim >= 2:
                param.normal_(0.0, 0.2)
            else:
                param.normal_(0.0, 0.1)


def load_hf_text_model(directory: str | os.PathLike, full: bool = False):
    """The transformers reference model for a tiny checkpoint (eager attention, eval mode)."""
    import transformers

    cls = transformers.CLIPModel if full else transformers.CLIPTextModelWithProjection
    return cls.from_pretrained(directory, attn_implementation="eager").eval()
