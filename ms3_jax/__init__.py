"""MS3 in JAX/Flax: multimodal supervised pretraining for semantic segmentation."""
from ms3_jax import platforms as _platforms

_platforms.choose_platforms()  # before any module of the package imports JAX
