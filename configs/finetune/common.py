r"""Shared fine-tuning config (paper 4.1-4.2, Tab. 2 / Tab. 3): DeepLab-v3+ / ResNet-50 as MMSeg.

The per-dataset files (`voc.py`, `ade20k.py`, `coco_stuff.py`, `cityscapes.py`, `mapillary.py`)
call `for_dataset(dataset, arg)`: `get_config` with the dataset's fine-tuning defaults (crop size,
batch, steps, base size) from its entry in ms3_jax/data/registry.py. Config strings (the part
after `:`), comma-separated:

  ms3 | torchvision | scratch   initialisation (Tab. 2 rows); the path goes in --config.init.path
  frozen                        frozen-backbone fine-tuning (Tab. 3)
  tab7                          Tab. 7's rows: ResNet-v1c (deep stem) with the auxiliary head
  r101                          ResNet-101 (with tab7: Tab. 7's Res101-v1c row)
  deit                          the DeiT-B/16 backbone (Tab. 7; configs/pretrain.py:deit) with
                                MMSeg's ViT recipe: AdamW lr 6e-5, weight decay 0.01 (not on
                                biases, norms, pos_embed, cls_token), poly power 1 to 0 after
                                1500 warm-up steps; crops rounded down to 16 px multiples
  tiny                          tiny model on the built-in synthetic data ('synth_a'), for tests

  python -m ms3_jax.main --config=configs/finetune/voc.py:ms3 --config.init.path=PRETRAIN_W --workdir=W
  python -m ms3_jax.main --config=configs/finetune/ade20k.py:deit,ms3 --config.init.path=W2 \
      --workdir=W
  python -m ms3_jax.main --config=configs/finetune/ade20k.py:torchvision,frozen \
      --config.init.path=resnet50-0676ba61.pth --workdir=W
  python -m ms3_jax.main --config=configs/finetune/voc.py:ms3,tab7,r101 \
      --config.init.path=PRETRAIN_W_R101_V1C --workdir=W

MMSegmentation defaults (what the paper follows): SGD lr 0.01, momentum 0.9, weight decay 5e-4 on
every parameter, poly decay (power 0.9) to 1e-4 per iteration, SyncBN (= global-batch BN under
jit), dropout 0.1 before the classifier, cross-entropy on logits upsampled to the crop, ignore
255, averaged over all pixels (MMSeg `avg_non_ignore=False`); no auxiliary FCN head (paper 4.1)
except in Tab. 7's rows (`tab7`: MMSeg's FCNHead on layer3, 256 channels, dropout 0.1, loss
weight 0.4, training only).
Training augmentation = MMSeg's: random rescale of the short side to s * base_size,
s ~ U[0.5, 2], random crop, flip, photometric distortion (approximated by the pipeline's colour
jitter: brightness 32/255, contrast and saturation 0.5, hue 18/180); evaluation on whole images
with the short side resized to base_size (MMSeg `Resize(scale=(2048, base), keep_ratio=True)`).
"""
import ml_collections

from configs import pretrain
from ms3_jax.data import registry
from ms3_jax.files import safe

INIT_ARGS = ("ms3", "torchvision", "scratch")
MODEL_ARGS = ("frozen", "tab7", "r101", "deit", "tiny")


def for_dataset(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
    """The config of a registered dataset with its fine-tuning defaults (`registry.DATASETS`)."""
    defaults = registry.get(dataset).finetune
    if defaults is None:
        raise ValueError(f"dataset {dataset!r} has no fine-tuning defaults; datasets with some: "
                         f"{', '.join(n for n, d in registry.DATASETS.items() if d.finetune)}")
    return get_config(dataset, arg, **defaults)


def get_config(dataset: str, arg: str | None, *, crop_size, batch_size: int, num_steps: int,
               base_size: int, eval_devices: int = 1) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "finetune"
    c.seed = 0
    c.batch_size = batch_size  # global, over all devices and processes
    c.num_steps = num_steps
    c.log_every = 50
    c.eval_every = num_steps // 10  # MMSeg: every 4k of 40k, 8k of 80k; 0: at the end only
    c.checkpoint_every = num_steps // 10
    c.keep_checkpoints = 2
    c.nonfinite = "stop"  # NaN / inf loss or gradients: 'stop' (error naming the step) | 'skip' the step
    c.nonfinite_max_skipped = 0.1  # 'skip': stop after more skipped steps (a count, or a fraction)
    # A resumed run refuses a config that computes something else (training.resume_changes)
    # unless the changed fields (or their prefixes, e.g. "optim") are named here.
    c.resume_overrides = ()
    c.frozen_backbone = False  # Tab. 3: backbone params and BN statistics fixed
    # Tab. 7: MMSeg's auxiliary FCNHead on layer3 (3x3 conv-BN-ReLU of 256 channels x
    # model.width, dropout, 1x1 classifier) adds loss.aux_weight x its CE; training only.
    c.aux_head = False

    # kind: 'ms3' (path = an MS3 pretraining workdir: its latest or `step` checkpoint; `ema` takes
    # the momentum encoder), 'torchvision' (path = ImageNet ResNet .pth / .safetensors in
    # torchvision / MMSeg naming), 'scratch'. what: 'backbone' (as the paper compares
    # pretrainings) | 'segmentor' (backbone + decode head; 'ms3' only; after a pretraining with
    # model.heads_at='aspp' the ASPP only: its decoder was never trained and stays fresh).
    c.init = ml_collections.ConfigDict(dict(kind="ms3", path="", step=0, ema=False, what="backbone"))

    c.model = ml_collections.ConfigDict(dict(
        backbone="resnet",  # 'resnet' | 'deit' (`:deit` sets its fields)
        depth=50, variant="v1", output_stride=8, width=1.0,
        stage_sizes=ml_collections.config_dict.placeholder(tuple),
        head_channels=512, c1_channels=48, dropout_rate=0.1, dtype="float32",
        kernels="auto"))  # 'auto' | 'xla' | 'cpu' (configs/pretrain.py)

    # data.worker_count: grain worker processes; -1 = one per core but two (a host feeding 8
    # chips needs tens of workers: benchmarks/data_throughput.py), 0 = read in this process.
    c.data = ml_collections.ConfigDict(dict(
        dataset=dataset, data_dir="", crop_size=crop_size, worker_count=-1,
        skip_unreadable=False,  # True: undecodable / badly labelled records replaced, counted
        synthetic=ml_collections.config_dict.placeholder(dict),  # kwargs of prepare_synthetic
        augment=dict(base_size=base_size, scale_range=(0.5, 2.0), flip_prob=0.5,
                     color_jitter_prob=1.0, brightness=32 / 255, contrast=0.5, saturation=0.5,
                     hue=0.1, grayscale_prob=0.0, blur_prob=0.0)))

    c.eval = ml_collections.ConfigDict(dict(
        split="validation", short_side=base_size, mode="whole",  # or 'slide' with crop / stride
        crop=ml_collections.config_dict.placeholder(tuple),
        stride=ml_collections.config_dict.placeholder(tuple),
        flip=False, max_images=0,  # 0: the whole split
        num_devices=eval_devices))  # per process (0: all local); > 1 pays off for repeated shapes

    c.optim = ml_collections.ConfigDict(dict(
        lr=0.01, min_lr=1e-4, power=0.9, momentum=0.9, weight_decay=5e-4,
        decay_all=True))  # MMSeg decays every parameter; False: kernels only (as pretraining)
    c.loss = ml_collections.ConfigDict(dict(ignore_index=255, avg_non_ignore=False,
                                            aux_weight=0.4))  # MMSeg's auxiliary loss weight

    args = [a for a in (arg or "").split(",") if a]
    unknown = [a for a in args if a not in INIT_ARGS + MODEL_ARGS]
    if unknown:
        raise ValueError(f"unknown config string(s) {unknown}; valid: "
                         f"{', '.join(INIT_ARGS + MODEL_ARGS)} (comma-separated)")
    if "deit" in args and {"tab7", "r101"} & set(args):
        raise ValueError("'tab7' and 'r101' are ResNet rows of Tab. 7; 'deit' is the DeiT-B row")
    if "deit" in args:
        deit(c)
    if "tiny" in args:
        tiny(c)
    kinds = [a for a in args if a in INIT_ARGS]
    if len(kinds) > 1:
        raise ValueError(f"choose one initialisation, got {kinds}")
    if kinds:
        c.init.kind = kinds[0]
    c.frozen_backbone = "frozen" in args
    if "tab7" in args:
        c.model.variant, c.aux_head = "v1c", True
    if "r101" in args:
        c.model.depth = 101
    return c


def deit(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tab. 7's DeiT-B backbone (the pretraining's fields) fine-tuned with MMSeg's ViT recipe
    (`upernet_vit-b16_mln_512x512_80k_ade20k`'s optimiser and schedule)."""
    c.model.update(pretrain.DEIT_B16)
    c.optim.update(dict(optimizer="adamw", lr=6e-5, min_lr=0.0, power=1.0, weight_decay=0.01,
                        decay_all=False, warmup_steps=1500))
    crop = c.data.crop_size
    c.data.crop_size = (crop - crop % 16 if isinstance(crop, int)
                        else tuple(s - s % 16 for s in crop))  # VOC's 513 -> 512
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny model on the synthetic 'synth_a' (7 classes): the same code path, seconds on a CPU."""
    c.init.kind = "scratch"  # unless a config string asks for another
    c.batch_size = 8
    c.num_steps = 4
    c.log_every = 2
    c.eval_every = 2
    c.checkpoint_every = 2
    c.model.update(dict(width=0.125, stage_sizes=(1, 1, 1, 1)))
    if c.model.backbone == "deit":  # `:deit,tiny`
        c.model.update(dict(pretrain.TINY_DEIT, img_size=32))
        c.optim.warmup_steps = 1
    crop = 32 if isinstance(c.data.crop_size, int) else (32, 32)  # Cityscapes' is (h, w)
    c.data.update(dict(dataset="synth_a", crop_size=crop, worker_count=0,
                       data_dir=safe.user_cache_dir("data", "finetune_synthetic")))
    c.data.synthetic = dict(num_train=16, num_val=4, image_size=64)
    c.data.augment.base_size = 48
    c.eval.update(dict(short_side=48, max_images=4))
    return c
