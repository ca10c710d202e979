r"""MS3 pretraining (stage 2), paper section 4.1.

  python -m ms3_jax.main --config=configs/pretrain.py --workdir=W
  python -m ms3_jax.main --config=configs/pretrain.py:deit --workdir=W  # DeiT-B/16 (Tab. 7)
  python -m ms3_jax.main --config=configs/pretrain.py:tiny --workdir=W \
      --config.text.embeddings=W1/text_embeddings.npz   # tiny model, synthetic data; W1: a stage-1
                                                        # workdir (configs/text_adapt.py:tiny)
  python -m ms3_jax.main --config=configs/pretrain.py:rn50 --workdir=W \
      --config.text.embeddings=W1/text_embeddings.npz   # Tab. 5: 1024-d T of CLIP RN50 (W1:
                                                        # configs/text_adapt.py:rn50); 'rn50,tiny'

Defaults are the paper's where it states them: DeepLab-v3+ / ResNet-50, two 3-layer 512-d
projection heads after the ASPP, VOC-aug + ADE20K + COCO-Stuff-164k (|Y| = 21 + 150 + 171 =
342), 224 crops, batch 128, SGD (momentum 0.9, weight decay 4e-5), lr 0.8 per 128 images with
cosine decay to 0, 100 epochs, tau 0.07, alpha 1. Not in the paper (docs/choices.md): output
stride 8 (the paper is silent; MMSegmentation's DeepLab-v3+ default, and a 28x28 map at 224 px
gives Eq. 1-9 more pixels per class than 16's 14x14; `model.output_stride=16` is cheaper), EMA
momentum 0.999 (MoCo), bank slots K = 256 and P = 32 pixels per class per step, lr warm-up, S
momentum and warm-up.

Memory of the per-class bank: |Y| x K x C x 2 bytes in bfloat16 = 342 x 256 x 512 x 2 = 90 MB;
V is |Y| x C float32 (0.7 MB) and S is |Y| x |Y| float32 (0.5 MB). All replicated.

Unlabeled images (App. D, Tab. 10), e.g. the paper's VOC + ADE20K + unlabeled COCO-Stuff:
  --config.data.datasets='("voc","ade20k")' --config.data.unlabeled.source=coco_stuff
  --config.data.unlabeled.ratio=0.5   (or source=/path/to/image/folder); see `c.pseudo`.
`:deit` (Tab. 7's DeiT-B row): the DeiT-B/16 backbone (models/deit.py; timm's
`deit_base_patch16_224` weights via `--config.model.init_from`) and AdamW at lr 3e-4 per 128
images (footnote 2), weight decay 0.05 and 5 epochs of warm-up (DeiT's recipe), cosine to 0; the
rest as above (docs/choices.md, "DeiT-B pretraining optimiser"). `:deit,tiny`: a tiny DeiT.
Config strings (after `:`), comma-separated: deit, rn50, tiny.

Prepare the datasets first: `python -m ms3_jax.data.prepare --dataset voc ...` (README).
"""
import ml_collections

from ms3_jax.files import safe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "pretrain"
    c.seed = 0
    c.batch_size = 128  # global, over all devices and processes
    c.num_epochs = 100
    c.num_steps = 0  # > 0 overrides num_epochs
    c.log_every = 50
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    # Every eval_every steps and at the end (0: never): each dataset's validation split segmented
    # by nearest T / V (evaluation/pretrain_eval.py) -> console, TensorBoard, W/results.json.
    c.eval_every = 10000
    # held_out: datasets outside data.datasets also evaluated (language head, by their own class
    # names embedded with stage 1's text model), e.g. ("cityscapes",).
    c.eval = ml_collections.ConfigDict(dict(max_images=200, short_side=512, held_out=()))
    c.nonfinite = "stop"  # NaN / inf loss or gradients: 'stop' (error naming the step) | 'skip' the step
    c.nonfinite_max_skipped = 0.1  # 'skip': stop after more skipped steps (a count, or a fraction)
    # A resumed run refuses a config that computes something else (training.resume_changes)
    # unless the changed fields (or their prefixes, e.g. "optim") are named here.
    c.resume_overrides = ()
    c.ema_momentum = 0.999

    c.model = ml_collections.ConfigDict(dict(
        backbone="resnet",  # 'resnet' | 'deit' (deeplab.BACKBONES; `:deit` sets its fields)
        depth=50, variant="v1", output_stride=8, width=1.0,
        stage_sizes=ml_collections.config_dict.placeholder(tuple),
        head_channels=512, c1_channels=48, emb_dim=512, dtype="bfloat16",
        heads_at="aspp",  # projection heads after the ASPP (paper 4.1) | 'decoder' (docs/choices.md)
        # 'auto': XLA's native convolutions on GPU / TPU, the CPU plug-in on CPU devices (decided
        # from the mesh the step is compiled for); 'xla' | 'cpu' force one (same numbers).
        kernels="auto",
        init_from=""))  # optional torchvision / MMSeg ResNet (timm DeiT) .pth for the backbone

    # data.worker_count: grain worker processes; -1 = one per core but two (a host feeding 8
    # chips needs tens of workers: benchmarks/data_throughput.py), 0 = read in this process.
    c.data = ml_collections.ConfigDict(dict(
        datasets=("voc", "ade20k", "coco_stuff"), data_dir="", crop_size=224, worker_count=-1,
        skip_unreadable=False,  # True: undecodable / badly labelled records replaced, counted
        weights=ml_collections.config_dict.placeholder(dict),  # None: proportional to size
        synthetic=ml_collections.config_dict.placeholder(dict),  # kwargs of prepare_synthetic
        # App. D / Tab. 10: images without labels. source: '' (none), a dataset name (its images
        # only, e.g. 'coco_stuff') or an image folder (*.jpg/*.jpeg/*.png, recursive); ratio:
        # expected fraction of each batch drawn from it, in (0, 1).
        unlabeled=ml_collections.ConfigDict(dict(source="", split="train", ratio=0.0))))
    # Pseudo-labels of unlabeled pixels (App. D): class c when the language argmax (I_l vs T) and
    # the visual argmax (I_v vs V) are both c and both softmax probabilities (at loss.tau) are
    # >= threshold (0 = the paper's rule). enter_bank: pseudo-labelled pixels may enter the bank.
    c.pseudo = ml_collections.ConfigDict(dict(threshold=0.0, enter_bank=False))

    c.text = ml_collections.ConfigDict(dict(
        # stage 1's W/text_embeddings.npz (required), or 'template': `clip` with the hand
        # `template` (Tab. 4's original-CLIP rows, an ablation)
        embeddings="",
        clip="openai/clip-vit-base-patch32", template="a photo of a {}."))

    c.loss = ml_collections.ConfigDict(dict(
        kind="ms3",  # 'ms3' | 'ce_single_head' | 'ce_multi_head' (Tab. 4)
        use_language=True, use_visual=True, multilabel=True,  # Tab. 4 / Tab. 6 switches
        tau=0.07, alpha=1.0, chunk=16384))  # chunk: pixels per device (16 images at 224: one)

    c.bank = ml_collections.ConfigDict(dict(slots=256, per_class=32, dtype="bfloat16"))
    # top_k > 0: keep per class only the k most similar of Eq. 6's pairs (not in the paper; opt-in)
    c.relations = ml_collections.ConfigDict(dict(momentum=0.99, warmup_steps=2000,
                                                 pixel_head="language", top_k=0))
    c.optim = ml_collections.ConfigDict(dict(
        optimizer="sgd",  # 'sgd' | 'adamw' (engine/optim.py)
        base_lr=0.8, lr_batch=128, momentum=0.9, weight_decay=4e-5, warmup_steps=1000))

    args = [a for a in (arg or "").split(",") if a]
    if unknown := [a for a in args if a not in ("deit", "rn50", "tiny")]:
        raise ValueError(f"unknown config string(s) {unknown}; valid: 'deit', 'rn50', 'tiny' "
                         "(comma-separated)")
    if "deit" in args:
        deit(c)
    if "tiny" in args:
        tiny(c)
    if "rn50" in args:
        rn50(c)
    return c


def rn50(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tab. 5's best row: T from stage 1 on CLIP's ResNet-50 (configs/text_adapt.py:rn50), so
    1024-d embeddings (the projection heads' output, the bank, V). T must come from that stage 1
    (text.embeddings=W1/text_embeddings.npz): the hand-template ablation reads Hugging Face
    checkpoints only, which have no CLIP ResNet."""
    c.model.emb_dim = 1024
    c.text.clip = ""
    return c


# DeiT-B/16 (timm's `deit_base_patch16_224`) and the neck's choices (docs/choices.md).
DEIT_B16 = dict(backbone="deit", img_size=224, patch_size=16, embed_dim=768, num_layers=12,
                num_heads=12, mlp_dim=3072, out_indices=(2, 11), neck_channels=768)
# A tiny DeiT for tests and the CPU demo: 2 blocks of width 32 on 16 px patches.
TINY_DEIT = dict(img_size=64, patch_size=16, embed_dim=32, num_layers=2, num_heads=2, mlp_dim=64,
                 out_indices=(0, 1), neck_channels=32)
# VOC-aug + ADE20K + COCO-Stuff-164k training images (10582 + 20210 + 118287).
UNION_TRAIN_IMAGES = 149_079


def deit(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tab. 7's DeiT-B backbone; footnote 2: AdamW, lr 3e-4 (per 128 images, linear scaling as
    the SGD lr), 100 epochs. Weight decay 0.05 and 5 warm-up epochs are DeiT's own recipe."""
    c.model.update(DEIT_B16)
    c.optim.update(dict(optimizer="adamw", base_lr=3e-4, lr_batch=128, weight_decay=0.05,
                        warmup_steps=5 * UNION_TRAIN_IMAGES // 128))
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny model on the built-in synthetic data: the same code path, seconds per step on a CPU."""
    c.batch_size = 8
    c.num_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.eval_every = 0
    c.eval.update(dict(max_images=4, short_side=0))
    c.model.update(dict(width=0.125, stage_sizes=(1, 1, 1, 1), emb_dim=32, dtype="float32"))
    c.data.update(dict(datasets=("synth_a", "synth_b", "synth_c"), crop_size=64, worker_count=0,
                       data_dir=safe.user_cache_dir("data", "synthetic")))  # per user, not /tmp
    c.data.synthetic = dict(num_train=64, num_val=16, image_size=96)
    c.text.clip = ""
    c.bank.update(dict(slots=64, per_class=16, dtype="float32"))
    c.relations.warmup_steps = 5
    c.optim.update(dict(base_lr=0.1, warmup_steps=2))
    if c.model.backbone == "deit":  # `:deit,tiny`
        c.model.update(TINY_DEIT)
        c.optim.base_lr = 1e-2  # AdamW: x 8 / 128 = 6e-4
    c.loss.chunk = 1024
    return c
