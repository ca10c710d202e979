"""MS3 in JAX/Flax: multimodal supervised pretraining for semantic segmentation."""
