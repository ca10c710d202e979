"""The demo job and what it brings: the whole path on the built-in synthetic data with a tiny random CLIP."""
