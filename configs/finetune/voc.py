r"""Fine-tune on PASCAL VOC 2012 (+SBD aug).

Crop size, batch, steps and base size: the dataset's entry in ms3_jax/data/registry.py.

  python -m ms3_jax.main --config=configs/finetune/voc.py:ms3 --config.init.path=PRETRAIN_W --workdir=W

Config strings: see configs/finetune/common.py (ms3 | torchvision | scratch, frozen,
tab7, r101, deit, tiny).
"""
try:
    from configs.finetune import common
except ImportError:  # given by path from outside the repository root
    import os
    import sys
    sys.path.append(os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))
    from configs.finetune import common


def get_config(arg: str | None = None):
    return common.for_dataset("voc", arg)
