"""Test setup: 8 simulated CPU devices (set before JAX initialises its backend), offline hubs,
and a persistent compilation cache so identical tiny programs compile once per run."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402


def pytest_configure(config):
    """Under pytest only (worker processes that import this module keep their own settings)."""
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "ms3_jax_test_xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# --- shared tiny configs (import them: `from tests.conftest import tiny_pretrain_config`) --------

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
