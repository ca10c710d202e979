r"""Fine-tune on Cityscapes (unseen in pretraining): 19 classes, 40k iterations, 512 x 1024 crops,
batch 8 (MMSeg 4 x 2), images rescaled around 1024 x 2048 and evaluated whole at 1024 x 2048.

  python -m ms3_jax.main --config=configs/finetune/cityscapes.py:ms3 --config.init.path=PRETRAIN_W --workdir=W

Config strings: see configs/finetune/common.py (ms3 | torchvision | scratch, frozen, tiny).
"""
try:
    from configs.finetune import common
except ImportError:  # given by path from outside the repository root
    import os
    import sys
    sys.path.append(os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
    from configs.finetune import common


def get_config(arg: str | None = None):
    c = common.get_config("cityscapes", arg, crop_size=(512, 1024), batch_size=8, num_steps=40_000,
                          base_size=1024)
    if c.data.dataset == "cityscapes":
        c.eval.num_devices = 0  # all images are 1024 x 2048: deal them to every local device
    return c
