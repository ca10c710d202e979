"""Where `--config=configs/...` paths resolve: the working directory, the checkout, or the
installed package (a wheel carries configs/ as `ms3_jax/configs`, pyproject.toml)."""
from __future__ import annotations

import os

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # ms3_jax/
REPO = os.path.dirname(PACKAGE)  # the checkout (editable installs)
PACKAGE_CONFIGS = os.path.join(PACKAGE, "configs")  # wheels


def find_config(path: str) -> str | None:
    """`path` as given if it exists; else in the checkout; else, for `configs/...`, in the
    installed package. None if none has it."""
    candidates = [path, os.path.join(REPO, path)]
    parts = os.path.normpath(path).split(os.sep)
    if parts[0] == "configs":
        candidates.append(os.path.join(PACKAGE_CONFIGS, *parts[1:]))
    return next((os.path.abspath(c) for c in candidates if os.path.isfile(c)), None)
