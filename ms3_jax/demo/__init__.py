"""The demo job and what it brings: the whole path on the synthetic data, a tiny random CLIP."""
