r"""Stage 1: adapt CLIP's language embeddings with learnable context (paper Sec. 3.2, Fig. 2, Tab. 1).

  python -m ms3_jax.main --config=configs/text_adapt.py --workdir=W1
  python -m ms3_jax.main --config=configs/pretrain.py --workdir=W2 --config.text.embeddings=W1/text_embeddings.npz
  python -m ms3_jax.main --config=configs/text_adapt.py:tiny --workdir=W   # tiny random CLIP, synthetic data
  python -m ms3_jax.main --config=configs/text_adapt.py:rn50 --workdir=W1  # Tab. 5: CLIP RN50

The image encoder (`encoder`): 'clip' (default), the vision tower of the same CLIP checkpoint
(paper Fig. 2, Tab. 5), its dense patch embeddings paired with T at the patch grid (7x7 for
ViT-B/32 at the 224 crops; ViT-B/16 or larger crops give finer grids), fine-tuned with AdamW
(`image_tower`, DenseCLIP's lr 1e-5 / wd 1e-4); or 'deeplab', the MS3 encoder with the language
head only, fresh (or `model.init_from`) with stage 2's SGD. Data fields are those of
configs/pretrain.py; model.emb_dim must equal the CLIP projection dim (512 for ViT-B, 1024 for
RN50). ':rn50' (Tab. 5): CLIP's ResNet-50 from an open_clip checkpoint, its dense map at stride
32 (7x7 at the 224 crops).
From the paper: M = 13 context tokens ("following DenseCLIP"; read as 13 learnable, see
docs/choices.md), pixel-embedding pairing with Eq. 1, tau 0.07. Not in the paper
(docs/choices.md): the context starts from "a photo of a" (last 4 slots) + N(0, 0.02) (first 9),
AdamW lr 2e-3 (no weight decay) with warm-up + cosine for it; the text tower frozen; 10 epochs
over the union; with encoder='deeplab' only, the context frozen for the first 20% of the steps
(until the fresh encoder separates classes; before that Eq. 1 lowers its loss by pulling T
together).

text.clip is a hub id or a local Hugging Face directory (config.json, model.safetensors,
vocab.json, merges.txt), or an open_clip checkpoint of a CLIP ResNet (a state-dict file, an
open_clip directory, 'hf-hub:<repo>'); offline, pass a directory. text.tiny_clip_dir, when set,
replaces text.clip: a tiny RANDOM CLIP (`text.tiny_clip_arch`) is written there first if the
directory has no checkpoint (a stand-in for demos and tests, no language knowledge).
"""
import importlib.util
import os

import ml_collections

from ms3_jax.files import safe


def _pretrain_config(arg: str | None) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
    spec = importlib.util.spec_from_file_location("_ms3_configs_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = set((arg or "").split(",")) - {""}
    if parts - {"tiny", "rn50"}:
        raise ValueError(f"unknown config string {arg!r}; valid: 'tiny', 'rn50', 'rn50,tiny'")
    c = _pretrain_config(arg or None)
    c.mode = "text_adapt"
    c.num_epochs = 10
    c.encoder = "clip"  # 'clip': CLIP's own vision tower (text.clip) | 'deeplab': the MS3 encoder
    # encoder='clip': the vision tower's AdamW (DenseCLIP: lr 1e-4 x 0.1 for the backbone, wd 1e-4),
    # warm-up (optim.warmup_steps) and cosine to 0; compute dtype model.dtype.
    # dense: CLIP ResNets only (rn50): 'value' = the attention pool's v_proj -> c_proj at every
    # location | 'attention' = every location through the pool's attention (docs/choices.md,
    # "CLIP's ResNet-50 tower (Tab. 5)").
    c.image_tower = ml_collections.ConfigDict(dict(lr=1e-5, weight_decay=1e-4, dense="value"))
    # Stage 2 only: the visual branch, the memory bank, the relations, the stage-1 output, its
    # evaluation.
    for key in ("ema_momentum", "bank", "relations", "eval_every", "eval"):
        del c[key]
    c.loss = ml_collections.ConfigDict(dict(tau=c.loss.tau, chunk=c.loss.chunk))
    c.data.augment = ml_collections.config_dict.placeholder(dict)  # AugmentConfig overrides
    c.text = ml_collections.ConfigDict(dict(
        clip="openai/clip-vit-base-patch32",  # hub id or local HF directory
        tiny_clip_dir="",  # when set: replaces clip; a tiny random CLIP is written there if absent
        tiny_clip_arch="vit",  # the stand-in written there: 'vit' (HF format) | 'rn50' (open_clip)
        dtype="float32",  # text tower compute dtype (params stay float32)
        num_ctx=13,  # M learnable context tokens (paper 4.1)
        ctx_init="a photo of a",  # its tokens initialise the last context slots; "" = all N(0, 0.02)
        train_text_tower=False,  # also fine-tune the CLIP text tower (at tower_lr)
        optimizer="adamw",  # 'adamw' | 'sgd' (momentum) for the context (and the tower)
        lr=2e-3, tower_lr=1e-5, momentum=0.9, weight_decay=0.0,
        # fraction of the steps before the context (and tower) start to learn; None: 0 with
        # encoder='clip', 0.2 with 'deeplab' (text_adapt.DEFAULT_FROZEN_STEPS)
        frozen_steps=ml_collections.config_dict.placeholder(float),
        template="a photo of a {}.",  # the hand template of the Tab. 1 baseline
        report_pairs=(("cat", "dog"), ("horse", "cow")),  # Tab. 1 pairs (skipped if not in Y)
    ))
    if "tiny" in parts:
        tiny(c)
    if "rn50" in parts:
        rn50(c, tiny="tiny" in parts)
    return c


def rn50(c: ml_collections.ConfigDict, tiny: bool = False) -> ml_collections.ConfigDict:
    """Tab. 5's best row: CLIP's ResNet-50 (open_clip weights; both towers), 1024-d embeddings.

    text.clip: open_clip's copy of OpenAI's RN50 on the hub (a local open_clip file or directory
    works too). The dense map is at stride 32 (7x7 labels at the 224 crops, as ViT-B/32). With
    'tiny': a tiny random CLIP ResNet (width 8, one block per stage, 64 px) written to
    text.tiny_clip_dir, 1024-d as the real one.
    """
    c.model.emb_dim = 1024
    c.text.clip = "hf-hub:timm/resnet50_clip.openai"
    c.text.tiny_clip_arch = "rn50"
    if tiny:
        c.text.clip = ""
        c.text.tiny_clip_dir = safe.user_cache_dir("tiny_clip_rn50")
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """configs/pretrain.py:tiny (synthetic data) + a tiny random CLIP with both towers (emb_dim 32).

    The tiny ViT (64 px, 8 px patches) is random, so it learns from scratch: image_tower.lr 3e-3
    (1e-3 reached pixel accuracy 0.23 in 100 steps, 3e-3 0.35; both lowered the mean cosine of T
    without a frozen phase). No photometric augmentation (the synthetic classes are mostly colour).
    With --config.encoder=deeplab: the tiny DeepLab at lr 0.1; add --config.text.frozen_steps=0.6
    (its context must wait for the fresh encoder: 30 of 100 steps were not enough).
    """
    c.num_steps = 100
    c.log_every = 10
    c.checkpoint_every = 50
    c.optim.base_lr = 1.6  # x 8 / 128 = 0.1 (encoder='deeplab')
    c.data.augment = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    c.text.clip = ""
    # text + vision (64 px, 8 px patches), in the per-user cache (~/.cache/ms3_jax)
    c.text.tiny_clip_dir = safe.user_cache_dir("tiny_clip_2towers")
    c.image_tower.lr = 3e-3
    c.text.lr = 0.02
    c.text.report_pairs = (("stairs", "stairway"), ("mountain", "hill"), ("ship", "boat"),
                           ("sky", "sand"))
    return c
