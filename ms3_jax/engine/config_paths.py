"""Where `--config=configs/...` paths resolve: the working directory, the checkout, or the
installed package (a wheel carries configs/ as `ms3_jax/configs`, pyproject.toml)."""
from __future__ import annotations

import ast
import glob
import os
import re

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


def available() -> list[str]:
    """The job configs of the checkout (or the installed package), as `configs/...` paths."""
    root = os.path.join(REPO, "configs") if os.path.isdir(os.path.join(REPO, "configs")) else PACKAGE_CONFIGS
    found = glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "finetune", "*.py"))
    return sorted("configs/" + os.path.relpath(p, root).replace(os.sep, "/") for p in found
                  if not os.path.basename(p).startswith(("_", "common")))


def docstring(path: str) -> str:
    """The config file's module docstring."""
    with open(path) as f:
        return (ast.get_docstring(ast.parse(f.read())) or "").strip()


_FIELD = re.compile(r"^\s*c\.([\w.]+)\s*=\s*(.*?)\s*(#\s*(.*))?$")


def field_docs(path: str) -> list[str]:
    """`  field = value  # comment` for every top-level `c.<field> = ...` line of a config file,
    the comment lines just above it first (what `--help` shows)."""
    with open(path) as f:
        lines = f.read().splitlines()
    out, above = [], []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append("    " + stripped)
            continue
        match = _FIELD.match(line)
        if match and line.startswith("    c."):
            field, value, _, comment = match.groups()
            out += above + [f"  {field} = {value}" + (f"  # {comment}" if comment else "")]
        above = []
    return out
