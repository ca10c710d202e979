"""Datasets: tfds builders, class lists, union label space, grain pipeline, synthetic data."""
