"""CLIP text tower in Flax, real-weight loading, and class-embedding encoding (Sec. 3.2, Fig. 2).

Language embeddings T (|Y| x 512, L2-normalised) from the hand template or M learnable context
tokens ``[W]_1 .. [W]_M [CLS]`` (CoOp) adapted with Eq. 1. docs/design.md, "CLIP towers".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import CLIPTokenizer

Array = jax.Array
Params = dict[str, Any]

DEFAULT_NUM_CTX = 13  # paper Sec. 4.1: "we set M to 13" (13 learnable tokens; docs/choices.md)
DEFAULT_CTX_INIT = "a photo of a"
DEFAULT_TEMPLATE = "a photo of a {}."
_CTX_INIT_STD = 0.02  # CoOp's random context initialisation N(0, 0.02)

# Checkpoint keys that belong to a full CLIPModel but not to its text tower (ignored when loading).
_IGNORED_KEY_PREFIXES = ("vision_model.", "visual_projection.", "logit_scale")
_IGNORED_KEYS = ("text_model.embeddings.position_ids",)  # a non-persistent buffer in old checkpoints
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_TOKENIZER_JSON = "tokenizer.json"
RANDOM_STANDIN_MARKER = "TINY_RANDOM_CLIP"  # in a directory written by demo.tiny_clip


def is_random_standin(directory: str | os.PathLike) -> bool:
    """True for a tiny *random* CLIP written as a stand-in (`demo.tiny_clip`: the marker file)."""
    return os.path.isfile(os.path.join(os.fspath(directory), RANDOM_STANDIN_MARKER))


def check_block_shape(config: Any) -> None:
    """The transformer-block fields a text or vision config shares (`ResidualBlock`): heads
    divide the width, the activation is supported."""
    if config.width % config.num_heads:
        raise ValueError(f"width {config.width} is not divisible by num_heads {config.num_heads}")
    if config.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; "
                         f"expected one of {sorted(_ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of the CLIP text tower (defaults: OpenAI ViT-B/32, whose text embeddings are 512-d).

    ``eos_token_id`` is the checkpoint config's value: ``2`` marks a legacy config, for which
    transformers pools at ``argmax(input_ids)`` (EOS is the largest id in CLIP's vocabulary); any
    other value pools at the first position equal to it. ``mlp_dim`` is ``intermediate_size``.
    """
    vocab_size: int = 49408
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    max_len: int = 77
    proj_dim: int = 512
    eos_token_id: int = 49407
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    mlp_dim: int = 2048

    def __post_init__(self):
        check_block_shape(self)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "CLIPTextConfig":
        """From a transformers ``CLIPConfig`` / ``CLIPTextConfig``, a config dict or a config.json path.

        A full ``CLIPModel`` config: ``text_config`` and the top-level ``projection_dim``. Dicts are
        parsed by transformers' config classes (missing keys: ``from_pretrained``'s defaults)."""
        if isinstance(hf_config, (str, os.PathLike)):
            with open(hf_config) as f:
                hf_config = json.load(f)
        if isinstance(hf_config, Mapping):
            is_full = "text_config" in hf_config or hf_config.get("model_type") == "clip"
            config_cls = transformers.CLIPConfig if is_full else transformers.CLIPTextConfig
            hf_config = config_cls.from_dict(dict(hf_config))
        text = getattr(hf_config, "text_config", hf_config)  # the text part of a CLIPConfig
        eos = text.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        return cls(vocab_size=int(text.vocab_size), width=int(text.hidden_size),
                   num_layers=int(text.num_hidden_layers), num_heads=int(text.num_attention_heads),
                   max_len=int(text.max_position_embeddings),
                   proj_dim=int(hf_config.projection_dim), eos_token_id=int(eos),
                   layer_norm_eps=float(text.layer_norm_eps), hidden_act=str(text.hidden_act),
                   mlp_dim=int(text.intermediate_size))


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # transformers "gelu" is exact (erf)
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def eos_positions(ids_UxL: Array, eos_token_id: int) -> Array:
    """Pooling position per sequence, by transformers' rule (see ``CLIPTextConfig``)."""
    ids_UxL = jnp.asarray(ids_UxL, jnp.int32)
    if eos_token_id == 2:  # legacy configs: EOS is the largest id
        return jnp.argmax(ids_UxL, axis=-1)
    return jnp.argmax(ids_UxL == eos_token_id, axis=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal (the text tower) or over all tokens (the vision tower);
    softmax in float32."""
    width: int
    num_heads: int
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        n, length, _ = x_BxLxD.shape
        head_dim = self.width // self.num_heads
        dense = functools.partial(nn.Dense, self.width, dtype=self.dtype, param_dtype=jnp.float32)
        split = lambda t: t.reshape(n, length, self.num_heads, head_dim)  # noqa: E731
        q_BxLxAxE, k_BxLxAxE, v_BxLxAxE = (split(dense(name=f"{p}_proj")(x_BxLxD)) for p in "qkv")
        logits_BxAxLxL = jnp.einsum(
            "nqhk,nshk->nhqs", q_BxLxAxE, k_BxLxAxE, preferred_element_type=jnp.float32
        ) * (head_dim**-0.5)
        if self.causal:
            causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
            logits_BxAxLxL = jnp.where(causal_LxL, logits_BxAxLxL, jnp.finfo(jnp.float32).min)
        weights_BxAxLxL = jax.nn.softmax(logits_BxAxLxL, axis=-1).astype(self.dtype)
        # docs/choices.md, "Attention written for GPUs"
        out_BxAxLxE = jnp.einsum("nhqs,nshk->nhqk", weights_BxAxLxL, v_BxLxAxE)
        return HeadsDense(self.width, self.dtype, name="out_proj")(out_BxAxLxE)


class HeadsDense(nn.Module):
    """``nn.Dense(width)`` over the flattened (head, channel) dims of ``[B, A, L, E]``: the same
    params (``kernel`` [A*E, width], ``bias``) and numbers, computed without a transpose."""
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxAxLxE: Array) -> Array:
        _, heads, _, head_dim = x_BxAxLxE.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (heads * head_dim, self.width),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.width,), jnp.float32)
        kernel_AxExD = kernel.astype(self.dtype).reshape(heads, head_dim, self.width)
        y_BxLxD = jnp.einsum("nhqk,hkd->nqd", x_BxAxLxE.astype(self.dtype), kernel_AxExD)
        return y_BxLxD + bias.astype(self.dtype)


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""
    width: int
    mlp_dim: int
    hidden_act: str = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        h_BxLxF = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(x_BxLxD)
        h_BxLxF = _ACTIVATIONS[self.hidden_act](h_BxLxF)
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(h_BxLxF)


class ResidualBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)); x + mlp(LN(x)). `config`: a text or vision
    config (width, num_heads, mlp_dim, hidden_act, layer_norm_eps)."""
    config: Any
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        c = self.config
        ln = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype,
                               param_dtype=jnp.float32)
        h_BxLxD = ln(name="layer_norm1")(x_BxLxD)
        attention = SelfAttention(c.width, c.num_heads, self.dtype, self.causal, name="self_attn")
        x_BxLxD = x_BxLxD + attention(h_BxLxD)
        h_BxLxD = ln(name="layer_norm2")(x_BxLxD)
        return x_BxLxD + MLP(c.width, c.mlp_dim, c.hidden_act, self.dtype, name="mlp")(h_BxLxD)


class CLIPTextTower(nn.Module):
    """CLIP text encoder + projection (paper Sec. 3.2, Fig. 2: the text encoder that yields ``T``).

    Entry points ``__call__`` (token ids), ``encode_embeddings`` (token embeddings) and
    ``encode_prompts`` (a ``PromptLayout`` + context) return float32 ``[U, proj_dim]``, not normalised.
    """
    config: CLIPTextConfig
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    def setup(self):
        c, dtypes = self.config, {"dtype": self.dtype, "param_dtype": jnp.float32}
        self.token_embedding = nn.Embed(c.vocab_size, c.width,
                                        embedding_init=nn.initializers.normal(0.02), **dtypes)
        self.position_embedding = self.param("position_embedding", nn.initializers.normal(0.01),
                                             (c.max_len, c.width), jnp.float32)
        self.layers = [ResidualBlock(c, self.dtype) for _ in range(c.num_layers)]
        self.final_layer_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, **dtypes)
        self.text_projection = nn.Dense(c.proj_dim, use_bias=False, **dtypes)

    def __call__(self, ids_UxL: Array) -> Array:
        """Text embeddings from token ids, pooled at EOS as transformers does."""
        eos_index_U = eos_positions(ids_UxL, self.config.eos_token_id)
        return self.encode_embeddings(self.embed_tokens(ids_UxL), eos_index_U)

    def embed_tokens(self, ids_UxL: Array) -> Array:
        """Token embeddings (no positions): the input that context vectors are spliced into."""
        return self.token_embedding(jnp.asarray(ids_UxL, jnp.int32))

    def encode_embeddings(self, x_UxLxD: Array, eos_index_U: Array) -> Array:
        """Positional embeddings, causal blocks, final LayerNorm, pool at ``eos_index_U``, project."""
        n, length, _ = x_UxLxD.shape
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}")
        h_UxLxD = x_UxLxD.astype(self.dtype) + self.position_embedding[:length].astype(self.dtype)
        for block in self.layers:
            h_UxLxD = block(h_UxLxD)
        # LayerNorm is per position, so pooling before it equals transformers' LN-then-pool.
        pooled_UxD = self.final_layer_norm(h_UxLxD[jnp.arange(n), jnp.asarray(eos_index_U, jnp.int32)])
        return self.text_projection(pooled_UxD).astype(jnp.float32)

    def encode_prompts(self, ids_UxL: Array, eos_index_U: Array, ctx_MxD: Array) -> Array:
        """Learned-context prompts (Fig. 2): embed ``ids_UxL``, replace slots 1..M by ``ctx_MxD``."""
        return self.encode_embeddings(splice_context(self.embed_tokens(ids_UxL), ctx_MxD), eos_index_U)


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """Token ids of the prompts of a class list and where each one pools.

    ``ids_UxL[:, 1:1+num_ctx]`` are placeholder slots (they hold the SOS id, which never collides
    with EOS pooling) that ``splice_context`` overwrites; ``eos_index_U`` is the EOS position.
    """
    ids_UxL: np.ndarray
    eos_index_U: np.ndarray
    num_ctx: int
    class_names: tuple[str, ...]


def check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """Reject empty and duplicate class names (CLIP lowercases, so duplicates are case-blind)."""
    if isinstance(class_names, str):
        raise TypeError("class_names must be a sequence of strings, not a single string")
    names = tuple(class_names)
    if not names:
        raise ValueError("class_names is empty")
    empty = [i for i, name in enumerate(names) if not isinstance(name, str) or not name.strip()]
    if empty:
        raise ValueError(f"empty class names at positions {empty}: {[names[i] for i in empty]!r}")
    seen: dict[str, str] = {}
    dups: list[str] = []
    for name in names:
        key = " ".join(name.lower().split())
        if key in seen:
            dups.append(f"{seen[key]!r} / {name!r}" if seen[key] != name else repr(name))
        else:
            seen[key] = name
    if dups:
        raise ValueError(f"duplicate class names: {', '.join(dups)}")
    return names


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    sos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if sos is None or eos is None:
        raise ValueError("the tokenizer has no bos/eos token; expected a CLIP tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(sos), int(eos), int(pad)


def _layout(rows: list[list[int]], names: tuple[str, ...], num_ctx: int, pad_id: int, max_len: int,
            pad_to_max_len: bool) -> PromptLayout:
    """Pads the token rows into a ``PromptLayout``; each row pools at its last token (EOS)."""
    length = max_len if pad_to_max_len else max(len(r) for r in rows)
    ids_UxL = np.full((len(rows), length), pad_id, dtype=np.int32)
    for i, row in enumerate(rows):
        ids_UxL[i, : len(row)] = row
    eos_index_U = np.array([len(r) - 1 for r in rows], dtype=np.int32)
    return PromptLayout(ids_UxL=ids_UxL, eos_index_U=eos_index_U, num_ctx=num_ctx, class_names=names)


def _too_long(name: str, n_tokens: int, max_len: int, what: str) -> ValueError:
    return ValueError(f"class name {name!r} is too long: its {what} needs {n_tokens} tokens, "
                      f"max_len is {max_len}")


def build_prompt_layout(tokenizer: Any, class_names: Sequence[str], num_ctx: int = DEFAULT_NUM_CTX,
                        max_len: int = 77, *, pad_to_max_len: bool = False) -> PromptLayout:
    """Token ids ``[SOS] ctx_1..ctx_M name-tokens "." [EOS] pad`` per class (Sec. 3.2, CoOp "end").

    The EOS index is shifted by M relative to the plain name. Padding goes to the longest prompt
    unless ``pad_to_max_len`` (the causal mask makes the result independent of the padding).
    A prompt longer than ``max_len`` raises a ValueError naming the class.
    """
    names = check_class_names(class_names)
    if num_ctx < 0:
        raise ValueError(f"num_ctx must be >= 0, got {num_ctx}")
    sos, eos, pad = _special_ids(tokenizer)
    rows = []
    for name in names:
        name_ids = list(tokenizer(name.strip() + ".", add_special_tokens=False)["input_ids"])
        row = [sos] + [sos] * num_ctx + name_ids + [eos]
        if len(row) > max_len:
            raise _too_long(name, len(row), max_len, f"prompt with {num_ctx} context tokens")
        rows.append(row)
    return _layout(rows, names, num_ctx, pad, max_len, pad_to_max_len)


def build_template_layout(tokenizer: Any, class_names: Sequence[str], template: str = DEFAULT_TEMPLATE,
                          max_len: int = 77, *, pad_to_max_len: bool = False) -> PromptLayout:
    """Token ids of a hand-designed template, e.g. "a photo of a {}." (original CLIP, Tab. 1)."""
    names = check_class_names(class_names)
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' slot for the class name")
    _, eos, pad = _special_ids(tokenizer)
    rows = []
    for name in names:
        row = list(tokenizer(template.format(name.strip()))["input_ids"])
        if not row or row[-1] != eos:
            raise ValueError(f"the tokenizer did not end the prompt for {name!r} with EOS")
        if len(row) > max_len:
            raise _too_long(name, len(row), max_len, f"prompt {template.format(name)!r}")
        rows.append(row)
    return _layout(rows, names, 0, pad, max_len, pad_to_max_len)


def splice_context(x_UxLxD: Array, ctx_MxD: Array) -> Array:
    """Replace positions 1..M of the token embeddings by the shared context vectors ``[W]_1..[W]_M``."""
    n, _, d = x_UxLxD.shape
    ctx_UxMxD = jnp.broadcast_to(ctx_MxD.astype(x_UxLxD.dtype)[None], (n, ctx_MxD.shape[0], d))
    return jnp.concatenate([x_UxLxD[:, :1], ctx_UxMxD, x_UxLxD[:, 1 + ctx_MxD.shape[0]:]], axis=1)


def init_context(rng: Array, params: Params, tokenizer: Any, num_ctx: int = DEFAULT_NUM_CTX,
                 init_phrase: str | None = DEFAULT_CTX_INIT) -> Array:
    """M context vectors, float32 ``[M, width]`` (Sec. 3.2: learnable contexts replace the template).

    With ``init_phrase`` the last k rows are the token embeddings of its k tokens, so the prompt
    starts out reading "... a photo of a [CLS]."; the first M - k rows (all rows without a phrase)
    are drawn from N(0, 0.02) as in CoOp. A phrase longer than M tokens is an error.
    """
    table_VxD = jnp.asarray(params["token_embedding"]["embedding"], jnp.float32)
    ctx_MxD = _CTX_INIT_STD * jax.random.normal(rng, (num_ctx, table_VxD.shape[1]), jnp.float32)
    if init_phrase:
        phrase_ids = list(tokenizer(init_phrase, add_special_tokens=False)["input_ids"])
        if len(phrase_ids) > num_ctx:
            raise ValueError(f"init phrase {init_phrase!r} has {len(phrase_ids)} tokens, "
                             f"more than num_ctx={num_ctx}")
        if phrase_ids:
            ctx_MxD = ctx_MxD.at[num_ctx - len(phrase_ids):].set(table_VxD[jnp.asarray(phrase_ids)])
    return ctx_MxD


def encode_classes(module: CLIPTextTower, params: Params, tokenizer: Any, class_names: Sequence[str],
                   ctx: Array | None = None, template: str = DEFAULT_TEMPLATE) -> Array:
    """L2-normalised class embeddings ``T`` ``[n, proj_dim]`` float32 (Sec. 3.2, Tab. 1).
    ``ctx=None``: the hand template (original CLIP embeddings). Otherwise ``ctx [M, width]``
    learned contexts: prompts ``[SOS] ctx name . [EOS]`` (``template`` is then unused)."""
    max_len, width = module.config.max_len, module.config.width
    if ctx is None:
        layout = build_template_layout(tokenizer, class_names, template, max_len)
        ctx_MxD = jnp.zeros((0, width), jnp.float32)  # no context: splicing is the identity
    else:
        ctx_MxD = jnp.asarray(ctx)
        if ctx_MxD.ndim != 2 or ctx_MxD.shape[1] != width:
            raise ValueError(f"ctx must be [M, {width}], got {ctx_MxD.shape}")
        layout = build_prompt_layout(tokenizer, class_names, ctx_MxD.shape[0], max_len)
    fn = jax.jit(functools.partial(module.apply, method=CLIPTextTower.encode_prompts))
    ids_UxL, eos_index_U = jnp.asarray(layout.ids_UxL), jnp.asarray(layout.eos_index_U)
    t_UxC = fn({"params": params}, ids_UxL, eos_index_U, ctx_MxD).astype(jnp.float32)
    return t_UxC / jnp.maximum(jnp.linalg.norm(t_UxC, axis=-1, keepdims=True), 1e-12)


def linear_keys(prefix: str) -> dict[str, tuple[str, bool]]:
    """HF keys of a Linear's kernel (transposed) and bias, for `hf_param_map`-style maps."""
    return {"kernel": (f"{prefix}.weight", True), "bias": (f"{prefix}.bias", False)}


def layer_norm_keys(prefix: str) -> dict[str, tuple[str, bool]]:
    """HF keys of a LayerNorm's scale and bias."""
    return {"scale": (f"{prefix}.weight", False), "bias": (f"{prefix}.bias", False)}


def block_keys(encoder: str, num_layers: int) -> dict[str, Any]:
    """The ``layers_<i>`` entries (`ResidualBlock`s) of a param map, HF keys ``<encoder>.<i>.*``."""
    return {f"layers_{i}": {
        "layer_norm1": layer_norm_keys(f"{encoder}.{i}.layer_norm1"),
        "self_attn": {p: linear_keys(f"{encoder}.{i}.self_attn.{p}")
                      for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm2": layer_norm_keys(f"{encoder}.{i}.layer_norm2"),
        "mlp": {"fc1": linear_keys(f"{encoder}.{i}.mlp.fc1"),
                "fc2": linear_keys(f"{encoder}.{i}.mlp.fc2")},
    } for i in range(num_layers)}


def hf_param_map(config: CLIPTextConfig) -> dict[str, Any]:
    """Flax param tree whose leaves are ``(hf_key, transpose)``: the explicit name mapping
    (torch Linear weights ``[out, in]`` -> Flax Dense kernels ``[in, out]``, transposed)."""
    return {
        "token_embedding": {"embedding": ("text_model.embeddings.token_embedding.weight", False)},
        "position_embedding": ("text_model.embeddings.position_embedding.weight", False),
        "final_layer_norm": layer_norm_keys("text_model.final_layer_norm"),
        "text_projection": {"kernel": ("text_projection.weight", True)},
        **block_keys("text_model.encoder.layers", config.num_layers),
    }


def is_key_leaf(x: Any) -> bool:
    """A leaf of a param map: `(hf key, transpose)`."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def convert_hf_state(state: Mapping[str, Any], mapping: dict[str, Any], reference: Any,
                     wanted: Callable[[str], bool], tower: str, source: str) -> Params:
    """Flax params (float32 numpy) of the param map `mapping` (shapes: `reference`) from a
    transformers state dict of numpy arrays. Transposed leaves: torch Linear ``[out, in]`` ->
    ``[in, out]``, Conv2d ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``. Keys not `wanted` are
    ignored; any other missing, unexpected or mis-shaped key is reported, all in one ValueError."""
    expected = {leaf[0] for leaf in jax.tree_util.tree_leaves(mapping, is_leaf=is_key_leaf)}
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in state if k not in expected and wanted(k))
    bad_shapes: list[str] = []

    def convert(leaf: tuple[str, bool], ref: jax.ShapeDtypeStruct) -> np.ndarray | None:
        key, transpose = leaf
        if key not in state:
            return None
        value = np.asarray(state[key], dtype=np.float32)
        if transpose:
            value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
        if value.shape != ref.shape:
            bad_shapes.append(f"{key}: {tuple(value.shape)} != expected {tuple(ref.shape)}")
        return value

    params = jax.tree_util.tree_map(convert, mapping, reference, is_leaf=is_key_leaf)
    problems = (("missing keys", missing), ("unexpected keys", unexpected),
                ("wrong shapes", bad_shapes))
    if parts := [f"{title} ({len(keys)}): {keys}" for title, keys in problems if keys]:
        raise ValueError(f"CLIP {tower} weights in {source} do not match the config: "
                         + "; ".join(parts))
    return params


def params_from_hf_state(state: Mapping[str, Any], config: CLIPTextConfig, *,
                         source: str = "checkpoint") -> Params:
    """Flax params (float32 numpy) from a transformers state dict of numpy arrays
    (`convert_hf_state`); keys of the vision tower of a full ``CLIPModel`` are ignored."""
    ids = jnp.zeros((1, 1), jnp.int32)
    reference = jax.eval_shape(lambda: CLIPTextTower(config).init(jax.random.key(0), ids)["params"])
    return convert_hf_state(state, hf_param_map(config), reference, _wanted, "text", source)


def _wanted(key: str) -> bool:
    return not key.startswith(_IGNORED_KEY_PREFIXES) and key not in _IGNORED_KEYS


def _read_safetensors(path: str, wanted: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """The `wanted` tensors of one safetensors file as float32 numpy (bfloat16 via the flax reader)."""
    out: dict[str, np.ndarray] = {}
    with safe_open(path, framework="numpy") as f:
        keys = [k for k in f.keys() if wanted(k)]
        bf16_keys = [k for k in keys if f.get_slice(k).get_dtype() == "BF16"]  # numpy has no bfloat16
        out.update((k, np.asarray(f.get_tensor(k), dtype=np.float32)) for k in keys if k not in bf16_keys)
    if bf16_keys:
        with safe_open(path, framework="flax") as f:
            out.update((k, np.asarray(f.get_tensor(k).astype(jnp.float32))) for k in bf16_keys)
    return out


def _read_torch_bin(path: str, wanted: Callable[[str], bool]) -> dict[str, np.ndarray]:
    try:
        import torch  # optional dependency (the `torch` extra): only for .bin checkpoints
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch, which is not installed: install torch, "
                          "or provide model.safetensors instead") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items() if wanted(k)}


def read_weights(ckpt_dir: str, wanted: Callable[[str], bool] = _wanted
                 ) -> tuple[dict[str, np.ndarray], str]:
    """(the `wanted` tensors of a Hugging Face checkpoint directory, the file they came from);
    prefers safetensors; of a sharded ``*.index.json`` reads only the shards holding wanted keys."""
    for name in ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json"):
        reader = _read_safetensors if "safetensors" in name else _read_torch_bin
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return reader(path, wanted), path
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        state: dict[str, np.ndarray] = {}
        for shard in sorted({file for key, file in weight_map.items() if wanted(key)}):
            shard_path = os.path.join(ckpt_dir, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"shard {shard_path} listed in {path} does not exist")
            state.update(reader(shard_path, wanted))
        return state, path
    raise FileNotFoundError(f"no CLIP weights in {ckpt_dir}: expected model.safetensors "
                            "(or model.safetensors.index.json, pytorch_model.bin)")


def _load_tokenizer(ckpt_dir: str) -> Any:
    has_files = all(os.path.isfile(os.path.join(ckpt_dir, f)) for f in _TOKENIZER_FILES)
    if not has_files and not os.path.isfile(os.path.join(ckpt_dir, _TOKENIZER_JSON)):
        raise FileNotFoundError(f"no CLIP tokenizer files in {ckpt_dir}: expected "
                                f"{' + '.join(_TOKENIZER_FILES)} (or {_TOKENIZER_JSON})")
    return CLIPTokenizer.from_pretrained(ckpt_dir, local_files_only=True)


def looks_like_path(name: str) -> bool:
    """Whether a CLIP name is a local path rather than a hub id."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.path.exists(name)


_HUB_FILES = [
    "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "preprocessor_config.json",
]


def resolve_hub(repo_id: str, cache_dir: str | None) -> str:
    """Local snapshot of a hub repo (HF_HUB_OFFLINE / the local cache are honoured)."""
    try:
        path = snapshot_download(repo_id, allow_patterns=_HUB_FILES, cache_dir=cache_dir)
        safetensors_files = ("model.safetensors", "model.safetensors.index.json")
        if not any(os.path.isfile(os.path.join(path, f)) for f in safetensors_files):
            path = snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["pytorch_model.bin*"],
                                     cache_dir=cache_dir)
    except Exception as e:  # network, offline without cache, unknown repo: say which and what to do
        raise OSError(
            f"could not get CLIP checkpoint {repo_id!r} from the Hugging Face hub or its local cache "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {type(e).__name__}: {e}. "
            "Pass a local directory with config.json, model.safetensors, vocab.json and merges.txt instead."
        ) from e
    return path


def checkpoint_dir(name_or_path: str | os.PathLike, cache_dir: str | None = None) -> str:
    """Local directory of a CLIP checkpoint: ``name_or_path`` itself, or a hub snapshot."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if looks_like_path(name):
        raise FileNotFoundError(f"CLIP checkpoint directory not found: {name}")
    return resolve_hub(name, cache_dir)


def load_clip_text(name_or_path: str | os.PathLike, dtype: Any = jnp.float32, *,
                   cache_dir: str | None = None) -> tuple[CLIPTextTower, Params, Any]:
    """Load a CLIP text tower: ``(module, params, tokenizer)`` (the text encoder of Sec. 3.2).

    ``name_or_path``: a local directory holding a ``CLIPModel`` or ``CLIPTextModelWithProjection``
    (config.json, model.safetensors or pytorch_model.bin, vocab.json + merges.txt), or a hub id
    such as "openai/clip-vit-base-patch32". Params are float32; ``dtype`` is the compute dtype.
    """
    ckpt_dir = checkpoint_dir(name_or_path, cache_dir)
    config_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in CLIP checkpoint directory {ckpt_dir}")
    config = CLIPTextConfig.from_hf(config_path)
    tokenizer = _load_tokenizer(ckpt_dir)
    state, weights_path = read_weights(ckpt_dir)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_hf_state(state, config, source=weights_path))
    return CLIPTextTower(config, dtype=dtype), params, tokenizer
