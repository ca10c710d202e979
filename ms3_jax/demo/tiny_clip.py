"""A tiny *random* CLIP text model in Hugging Face format: a stand-in where real CLIP cannot be had.

``save_tiny_clip(directory)`` writes a hub-snapshot-like checkpoint (width 32, 2 layers) that
``clip_text.load_clip_text`` reads like real CLIP, for stage 1 (Sec. 3.2, Fig. 2) in the demo and
tests; ``save_tiny_open_clip_rn`` the same text tower with a tiny CLIP ResNet in open_clip's
format (Tab. 5's RN50 stand-in). Random weights plus a planted ``WORD_PRIOR``; marked by
``TINY_RANDOM_CLIP``. Details: docs/design.md, "The tiny random CLIP"; the prior:
docs/choices.md, "Synthetic demo data 2.0".
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import safetensors.numpy
import transformers  # a lazy module: the CLIP classes load on first use

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.files import safe
from ms3_jax.models import clip_resnet, clip_text, clip_vision, open_clip_format
from ms3_jax.models.clip_text import RANDOM_STANDIN_MARKER as MARKER_FILE

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-/&()"
SOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words that get a merged token by default: the hand template, Tab. 1's pairs, the synthetic
# demo classes (ms3_jax.data.synthetic) and a few common ones.
DEFAULT_WORDS = (
    "a", "photo", "of", "cat", "dog", "horse", "cow", "person", "car", "traffic", "light",
    "potted", "plant", "sky", "grass", "stairway", "stairs", "mountain", "hill", "path", "dirt",
    "track", "building", "water", "lake", "ship", "boat", "tree", "road", "sand", "vegetation",
    "terrain", "sidewalk", "river",
)
# word -> {anchor: cosine of its token embedding to the anchor's}. Anchors are never redrawn.
# English associations set by hand, strong to weak; deliberately not ms3_jax.data.synthetic's
# relations (some planted ones weak, some unrelated words strong).
WORD_PRIOR: dict[str, dict[str, float]] = {
    "boat": {"ship": 0.9}, "stairway": {"stairs": 0.85}, "river": {"water": 0.75},
    "sidewalk": {"road": 0.75}, "terrain": {"mountain": 0.7, "grass": 0.2}, "dirt": {"sand": 0.6},
    "hill": {"mountain": 0.55}, "lake": {"water": 0.45}, "building": {"stairs": 0.4},
    "vegetation": {"tree": 0.35}, "track": {"path": 0.25},
}
DEFAULT_WIDTH = 32
DEFAULT_PROJ_DIM = 32  # = configs/pretrain.py:tiny model.emb_dim, so stage 1 feeds stage 2
DEFAULT_NUM_CTX = 13  # the paper's M (clip_text.DEFAULT_NUM_CTX)
_MIN_MAX_LEN = 32


def _split_words(words: Iterable[str]) -> list[str]:
    """Lowercase words of the given names/phrases, first-seen order, characters outside CHARS dropped."""
    out: list[str] = []
    for phrase in words:
        for word in str(phrase).lower().split():
            word = "".join(c for c in word if c in CHARS)
            if word and word not in out:
                out.append(word)
    return out


def _apply_merges(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding as CLIP's tokenizer runs it: merge the lowest-ranked adjacent pair
    (every occurrence, left to right) until no adjacent pair has a merge."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def vocab_and_merges(words: Iterable[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """The BPE vocabulary (token -> id) and merge list for ``words``: each word one token.

    Single characters are always in the vocabulary (with and without ``</w>``); the merge rule:
    docs/design.md, "The tiny random CLIP".
    """
    vocab: dict[str, int] = {}
    for token in list(CHARS) + [c + "</w>" for c in CHARS]:
        vocab[token] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in _split_words(words):
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = _apply_merges(symbols, ranks)
    vocab[SOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in ranks]


def write_tokenizer(directory: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS) -> int:
    """Write vocab.json + merges.txt (the tokenizer files of a CLIP hub checkpoint); returns the vocab size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def text_config(words: Iterable[str] = DEFAULT_WORDS, *, max_len: int = _MIN_MAX_LEN,
                width: int = DEFAULT_WIDTH, proj_dim: int = DEFAULT_PROJ_DIM,
                legacy_eos: bool = False, **overrides):
    """A transformers ``CLIPTextConfig`` for the tiny tokenizer: 2 layers, 4 heads, MLP 2 x width.

    ``legacy_eos`` writes ``eos_token_id=2`` (old CLIP configs: pooling at argmax of the ids).
    """
    vocab, _ = vocab_and_merges(words)
    kwargs = dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_len,
                  projection_dim=proj_dim, hidden_act="quick_gelu", bos_token_id=vocab[SOS],
                  eos_token_id=2 if legacy_eos else vocab[EOS], pad_token_id=vocab[EOS])
    return transformers.CLIPTextConfig(**{**kwargs, **overrides})


def _prompt_length(directory: Path, words: Iterable[str], num_ctx: int) -> int:
    """Longest ``[SOS] ctx_1..ctx_M name "." [EOS]`` (and template prompt) over ``words``."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    length = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    longest = max([1] + [length(str(name).strip() + ".") for name in words])
    return 2 + max(num_ctx, length("a photo of a")) + longest


def save_tiny_clip(directory: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS, *,
                   full: bool = False, seed: int = 0, max_len: int | None = None,
                   width: int = DEFAULT_WIDTH, proj_dim: int = DEFAULT_PROJ_DIM,
                   legacy_eos: bool = False, sharpen: bool = True,
                   num_ctx: int = DEFAULT_NUM_CTX,
                   prior: Mapping[str, Mapping[str, float]] | None = None,
                   vision_overrides: Mapping[str, Any] | None = None) -> Path:
    """Save a random ``CLIPTextModelWithProjection`` (a full ``CLIPModel`` if ``full``) + tokenizer.

    ``words``: names / phrases whose words get a single token each (others tokenize per
    character). ``max_len`` defaults to the longest learned-context prompt over ``words`` (at least
    32); a given one too small for them is an error. ``sharpen``: larger weights than CLIP's init.
    ``prior`` (default ``WORD_PRIOR``; ``{}`` for none): word -> {anchor: cosine}.
    ``vision_overrides`` (``full`` only): ``CLIPVisionConfig`` fields for the tiny vision tower.
    Writes a ``TINY_RANDOM_CLIP`` marker. docs/design.md, "The tiny random CLIP".
    """
    import torch  # optional dependency (the `torch` extra)

    directory = Path(directory)
    words = [str(w) for w in words]
    write_tokenizer(directory, words)
    needed = _prompt_length(directory, words, num_ctx)
    if max_len is None:
        max_len = max(_MIN_MAX_LEN, needed)
    elif max_len < needed:
        raise ValueError(f"max_len={max_len} is too short: the longest prompt over the given words "
                         f"with {num_ctx} context tokens needs {needed}")
    torch.manual_seed(seed)
    config = text_config(words, max_len=max_len, width=width, proj_dim=proj_dim,
                         legacy_eos=legacy_eos)
    if vision_overrides and not full:
        raise ValueError("vision_overrides needs full=True (a text-only model has no vision tower)")
    if full:
        vision_config = transformers.CLIPVisionConfig(**{
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 16,
            "projection_dim": proj_dim, **(vision_overrides or {}),
        })
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=config.to_dict(), vision_config=vision_config.to_dict(),
            projection_dim=proj_dim))
    else:
        model = transformers.CLIPTextModelWithProjection(config)
    if sharpen:
        _sharpen(model, seed)
    _plant_prior(model, vocab_and_merges(words)[0], WORD_PRIOR if prior is None else prior)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / MARKER_FILE).write_text(
        "A tiny CLIP with RANDOM weights written by ms3_jax.demo.tiny_clip.save_tiny_clip:\n"
        "a stand-in for tests and demos, not pretrained CLIP. Its embeddings carry no language "
        "knowledge beyond a planted prior of word associations (WORD_PRIOR), which is not the\n"
        "synthetic data's answer key.\n")
    return directory


def tiny_vision(image_size: int, patch_size: int = 8) -> dict[str, Any]:
    """``vision_overrides`` of the stage-1 stand-in: a width-32, 2-layer ViT whose native size is
    ``image_size`` (no position interpolation at that crop), ``patch_size`` px patches."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": image_size, "patch_size": patch_size}


def save_tiny_open_clip_rn(directory: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS,
                           *, seed: int = 0, proj_dim: int = DEFAULT_PROJ_DIM,
                           num_ctx: int = DEFAULT_NUM_CTX, image_size: int = 64,
                           vision: Mapping[str, Any] | None = None) -> Path:
    """A random CLIP ResNet in open_clip's hub layout (``open_clip_config.json``,
    ``open_clip_model.safetensors``, CLIP tokenizer files, the ``TINY_RANDOM_CLIP`` marker): the
    stand-in of Tab. 5's RN50 for stage 1 in tests and the demo. The text tower is
    `save_tiny_clip`'s (same words, seed, prior and sharpening); the image tower a width-8
    ModifiedResNet with one block per stage (``vision``: `clip_resnet.CLIPResNetConfig` fields),
    Flax's random init, BatchNorm statistics 0 / 1."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_clip(tmp, words, seed=seed, proj_dim=proj_dim, num_ctx=num_ctx)
        text_module, text_params, _ = clip_text.load_clip_text(tmp)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tmp, name), directory / name)
    rn_config = clip_resnet.CLIPResNetConfig(**{
        "layers": (1, 1, 1, 1), "width": 8, "proj_dim": proj_dim, "image_size": image_size,
        **(vision or {})})
    pixels = jax.numpy.zeros((1, image_size, image_size, 3), jax.numpy.float32)
    variables = jax.jit(clip_resnet.CLIPResNetTower(rn_config).init)(
        jax.random.key(seed), pixels)
    state = open_clip_format.state_from_variables(text_params, variables, rn_config,
                                                  text_module.config)
    safetensors.numpy.save_file(state, str(directory / open_clip_format.WEIGHT_FILES[0]))
    meta = {"model_cfg": open_clip_format.model_cfg(rn_config, text_module.config),
            "preprocess_cfg": {"mean": list(clip_vision.CLIP_PIXEL_MEAN),
                               "std": list(clip_vision.CLIP_PIXEL_STD)}}
    (directory / open_clip_format.CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    (directory / MARKER_FILE).write_text(
        "A tiny CLIP ResNet with RANDOM weights written by ms3_jax.demo.tiny_clip."
        "save_tiny_open_clip_rn:\na stand-in for tests and demos, not pretrained CLIP (its "
        "text tower is save_tiny_clip's, with the planted WORD_PRIOR).\n")
    return directory


def write_for_config(config: ml_collections.ConfigDict) -> None:
    """Stage 1's ``text.tiny_clip_dir`` (the tiny configs, the demo): written when it holds no
    checkpoint (by process 0, the others wait), with the words of the union classes and the
    Tab. 1 pairs; a text-only one (written before stage 1 used CLIP's image tower) is refused
    for ``encoder='clip'``. ``text.tiny_clip_arch`` 'rn50': `save_tiny_open_clip_rn` (Tab. 5).
    Another user's directory (or one that would be created inside theirs) is refused
    (`safe.UnsafePath`) before anything in it is read: a checkpoint planted there could be
    anything."""
    tc, tiny_dir = config.text, config.text.tiny_clip_dir
    safe.refuse_foreign_dir(tiny_dir, "text.tiny_clip_dir", creating=True)
    if tc.get("tiny_clip_arch", "vit") == "rn50":
        _write_rn_for_config(config)
        return
    config_path = os.path.join(tiny_dir, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            if config.encoder == "clip" and "vision_config" not in json.load(f):
                raise ValueError(f"text.tiny_clip_dir={tiny_dir} holds a text-only CLIP (written "
                                 "before stage 1 used CLIP's image tower); encoder='clip' needs "
                                 "both towers: remove the directory to have it rewritten")
        return
    if jax.process_index() == 0:
        logging.warning("text.tiny_clip_dir: writing a tiny CLIP with RANDOM weights to %s -- a "
                        "stand-in for demos/tests, NOT pretrained CLIP; its embeddings carry no "
                        "language knowledge", tiny_dir)
        safe.make_own_dir(tiny_dir, "text.tiny_clip_dir")
        save_tiny_clip(tiny_dir, _union_words(config), proj_dim=config.model.emb_dim,
                       num_ctx=tc.num_ctx, seed=config.seed, full=True,
                       vision_overrides=tiny_vision(config.data.crop_size))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("tiny_clip_written")


def _union_words(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    names = LabelSpace.from_datasets(list(config.data.datasets)).names
    pairs = tuple(w for pair in config.text.report_pairs for w in pair)
    return DEFAULT_WORDS + tuple(names) + pairs


def _write_rn_for_config(config: ml_collections.ConfigDict) -> None:
    tiny_dir = config.text.tiny_clip_dir
    if os.path.isfile(os.path.join(tiny_dir, open_clip_format.CONFIG_FILE)):
        return
    if os.path.isfile(os.path.join(tiny_dir, "config.json")):
        raise ValueError(f"text.tiny_clip_dir={tiny_dir} holds a Hugging Face CLIP, but "
                         "text.tiny_clip_arch='rn50' needs an open_clip ResNet: use another "
                         "directory or remove it to have it rewritten")
    if jax.process_index() == 0:
        logging.warning("text.tiny_clip_dir: writing a tiny CLIP ResNet with RANDOM weights to "
                        "%s -- a stand-in for demos/tests, NOT pretrained CLIP RN50", tiny_dir)
        safe.make_own_dir(tiny_dir, "text.tiny_clip_dir")
        save_tiny_open_clip_rn(tiny_dir, _union_words(config), seed=config.seed,
                               proj_dim=config.model.emb_dim, num_ctx=config.text.num_ctx,
                               image_size=config.data.crop_size)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("tiny_clip_written")


def _plant_prior(model, vocab: Mapping[str, int], prior: Mapping[str, Mapping[str, float]]) -> None:
    """Token embedding of each word := |e_w| (sum_a cos_a u_a + sqrt(1 - sum_a cos_a^2) u_w), with
    u_a the anchors' unit vectors and u_w the unit part of e_w orthogonal to them: the cosine to
    a lone anchor is cos_a exactly (to several, up to the anchors' own small cosines). Anchors
    must not be redrawn themselves."""
    import torch  # optional dependency (the `torch` extra)

    if redrawn := set(prior) & {a for anchors in prior.values() for a in anchors}:
        raise ValueError(f"prior: {sorted(redrawn)} are both redrawn and anchors")
    table = model.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        for word, anchors in prior.items():
            w = vocab.get(word + "</w>")
            rows = [(vocab.get(a + "</w>"), c) for a, c in anchors.items()]
            if w is None or any(a is None for a, _ in rows):
                continue
            units = torch.stack([table[a] / table[a].norm() for a, _ in rows])
            q, _ = torch.linalg.qr(units.T)  # orthonormal basis of the anchors' span
            rest = table[w] - q @ (q.T @ table[w])
            own = max(1.0 - sum(c * c for _, c in rows), 0.0) ** 0.5
            mixed = sum(c * u for (_, c), u in zip(rows, units)) + own * rest / rest.norm()
            table[w] = table[w].norm() * mixed / mixed.norm()


def _sharpen(model, seed: int) -> None:
    """Larger random weights than CLIP's init, so attention is far from uniform and the token
    identities survive the tower (and any mismatch in mask, pooling, activation or LayerNorm
    placement shows up in parity tests). Drawn from ``seed``, the text tower's first, so it is
    the same with or without a vision tower."""
    import torch  # optional dependency (the `torch` extra)

    torch.manual_seed(seed)
    named = sorted(model.named_parameters(), key=lambda item: not item[0].startswith("text"))
    with torch.no_grad():
        for name, param in named:
            if "norm" in name:  # layer_norm1/2, final_layer_norm, pre_layrnorm, post_layernorm
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
            elif "embedding" in name:
                param.normal_(0.0, 0.5)
            elif param.ndim >= 2:
                param.normal_(0.0, 0.2)
            else:
                param.normal_(0.0, 0.1)
