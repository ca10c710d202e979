"""The tests' tiny configs: configs/*.py:tiny with test-sized overrides."""
from __future__ import annotations

import importlib.util
import os

from ms3_jax.testing.paths import ROOT


def with_overrides(config, **dotted):
    """`config` with `{'data.crop_size': 32, ...}` applied (dotted paths into the ConfigDict)."""
    config.update_from_flattened_dict(dotted)
    return config


def tiny_pretrain_config(**overrides):
    """configs/pretrain.py:tiny at batch 8 (one image per simulated device), 32 px crops."""
    from configs import pretrain as pretrain_config
    return with_overrides(pretrain_config.get_config("tiny"), **{"batch_size": 8, "data.crop_size": 32,
                                                                 **overrides})


def tiny_finetune_config(data_dir, **overrides):
    """configs/finetune/voc.py:tiny on `data_dir`: 2 steps, eval and checkpoint at step 2."""
    from configs.finetune import voc as voc_config
    return with_overrides(voc_config.get_config("tiny"), **{
        "data.data_dir": data_dir, "num_steps": 2, "eval_every": 2, "checkpoint_every": 2,
        "log_every": 1, "eval.max_images": 2, **overrides})


def text_adapt_config(arg: str = "tiny"):
    """configs/text_adapt.py:`arg`, loaded from the checkout's file."""
    spec = importlib.util.spec_from_file_location(
        "_text_adapt_config", os.path.join(ROOT, "configs", "text_adapt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
