r"""Fine-tune on the built-in synthetic data: the demo's held-out synth_d, from the demo's MS3
backbone or from scratch, a few minutes each on a CPU.

  python -m ms3_jax.main --config=configs/demo.py --workdir=runs/demo    # the MS3 backbone, first
  python -m ms3_jax.main --config=configs/finetune/synthetic.py:ms3 \
      --config.init.path=runs/demo/pretrain --workdir=runs/ft_ms3
  python -m ms3_jax.main --config=configs/finetune/synthetic.py:scratch --workdir=runs/ft_scratch

Each run ends with one line `synth_d: mIoU ... -> W/results.json`: compare the two.
The data: synth_d (7 classes, one of them a concept no pretraining dataset has; Mapillary's role
in Tab. 3), never seen by the demo's pretraining, at the demo's size and difficulties
(configs/demo.py's `synthetic`: the same training images as the demo's W/data) with more
validation images, built once into the per-user cache (data.data_dir). The model: the demo's
pretraining model (configs/demo.py's `pretrain.model`), so its backbone loads; trained with
configs/finetune/common.py's MMSeg recipe (SGD lr 0.01, poly) at the demo's batch and crop.
The budget (NUM_STEPS, batch 16: about 24 epochs of synth_d's 200 training images) was fixed
before any result was seen; evaluation and checkpoints at every third of `num_steps` (they follow
--config.num_steps). Numbers measured on 2 CPU cores: README.md, "Try it".

Config strings (comma-separated): ms3 (init.path = a demo's W/pretrain or any pretraining
workdir of this model) | scratch, frozen (the backbone fixed, Tab. 3), tiny (tests: 4 steps on
small images).
"""
try:
    from configs import demo
    from configs.finetune import common
except ImportError:  # given by path from outside the repository root
    import os
    import sys
    sys.path.append(os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
    from configs import demo
    from configs.finetune import common
from ms3_jax.data import synthetic
from ms3_jax.files import safe

ARGS = ("ms3", "scratch", "frozen", "tiny")
NUM_STEPS = 300
NUM_VAL = 100  # validation images (the demo builds 20): a steadier mIoU


def get_config(arg: str | None = None):
    args = [a for a in (arg or "").split(",") if a]
    if unknown := [a for a in args if a not in ARGS]:
        raise ValueError(f"unknown config string(s) {unknown}; valid: {', '.join(ARGS)} "
                         "(comma-separated)")
    shown = demo.get_config()
    pre, data = shown.pretrain, dict(shown.synthetic)
    c = common.get_config(synthetic.HELD_OUT_DATASET, ",".join(a for a in args if a != "tiny"),
                          crop_size=pre.data.crop_size, batch_size=pre.batch_size,
                          num_steps=NUM_STEPS, base_size=data["image_size"])
    c.model.update(dict(width=pre.model.width, stage_sizes=tuple(pre.model.stage_sizes),
                        depth=pre.model.depth, variant=pre.model.variant))
    c.log_every = 50
    # A few evaluations and checkpoints per run, at every third of num_steps (also when it is
    # overridden): ceil(num_steps / 3).
    c.eval_every = (c.get_ref("num_steps") + 2) // 3
    c.checkpoint_every = (c.get_ref("num_steps") + 2) // 3
    c.data.update(dict(worker_count=0, data_dir=safe.user_cache_dir("data", "finetune_synth_d")))
    c.data.synthetic = dict(data, num_val=NUM_VAL)
    c.eval.update(dict(short_side=data["image_size"], max_images=0))
    if "tiny" in args:  # tests: seconds; the data of configs/finetune/*.py:tiny
        c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 0, 4
        c.batch_size, c.data.crop_size, c.data.augment.base_size = 8, 32, 48
        c.data.data_dir = safe.user_cache_dir("data", "finetune_synthetic")
        c.data.synthetic = dict(num_train=16, num_val=4, image_size=64)
        c.eval.update(dict(short_side=48, max_images=4))
    return c
