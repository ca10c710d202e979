"""Datasets: builders, class lists, label space, sources, augmentation, train pipeline, eval data."""
