r"""Fine-tune on Mapillary Vistas v1.2 (unseen in pretraining): 65 classes, 40k iterations,
768 x 768 crops, batch 8 (MMSeg 4 x 2), short side rescaled around 1024 and evaluated at 1024.

  python -m ms3_jax.main --config=configs/finetune/mapillary.py:ms3 --config.init.path=PRETRAIN_W --workdir=W

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
    return common.get_config("mapillary", arg, crop_size=768, batch_size=8, num_steps=40_000,
                             base_size=1024)
