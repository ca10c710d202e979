"""Model variables for tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, shape=(1, 32, 32, 3), *, seed=0, scale=0.3):
    """Random variables of `model` on inputs of `shape` without compiling `init` (slow on a busy
    CPU): normal(0, `scale`) leaves, BN variances uniform in [0.5, 1.5] (positive)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))

    def fill(path, x):
        if path[-1].key == "var":
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        return (scale * rng.normal(size=x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, abstract)
