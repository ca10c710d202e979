"""The package's dependency rule (docs/design.md, "Layout"), read from the imports of every module.

Layers, lowest first: files (safe local writes); data and models; method; engine; evaluation; stages; the tools at the
package root and demo/. A module imports only its own layer or lower ones; no stage imports
another stage; nothing outside testing/ imports testing/; the engine imports neither the export
tool nor the synthetic data; no module reaches into another's private names.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ms3_jax"
# group -> the groups it may import (its own included)
ALLOWED = {
    "files": {"files"},
    "data": {"data", "files"},
    "models": {"models", "files"},
    "method": {"method", "data", "models", "files"},
    "engine": {"engine", "data", "models", "files"},
    "evaluation": {"evaluation", "data", "models", "method", "engine", "files"},
    "stages": {"data", "models", "method", "engine", "evaluation", "files"},
    "demo": {"demo", "data", "models", "method", "engine", "evaluation", "stages", "tools", "files"},
    "tools": {"data", "models", "method", "engine", "evaluation", "stages", "demo", "tools", "files"},
    "testing": {"testing", "data", "models", "method", "engine", "evaluation", "stages", "demo",
                "tools", "files"},
}
FORBIDDEN = {("ms3_jax.engine", "ms3_jax.export"), ("ms3_jax.engine", "ms3_jax.data.synthetic")}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def group(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return "tools"  # ms3_jax/<tool>.py and the package itself


def imports(path: pathlib.Path) -> list[tuple[str, set[str]]]:
    """(imported ms3_jax module, names taken from it) of every import statement, nested ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, set()) for a in node.names if a.name.startswith("ms3_jax")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ms3_jax"):
            for a in node.names:  # `from pkg import module` imports the module
                sub = f"{node.module}.{a.name}"
                out.append((sub, set()) if sub in MODULES else (node.module, {a.name}))
    return out


def private_uses(path: pathlib.Path) -> list[str]:
    """`alias._name` where alias is an imported ms3_jax module."""
    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ms3_jax"):
            aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return [f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in aliases and n.attr.startswith("_") and not n.attr.startswith("__")]


EDGES = [(src, dst, names) for src, path in MODULES.items() for dst, names in imports(path)]


def test_every_import_resolves_to_a_module_of_the_package():
    assert EDGES and all(dst in MODULES for _, dst, _ in EDGES), \
        [dst for _, dst, _ in EDGES if dst not in MODULES]


@pytest.mark.parametrize("rule", ["layers", "stages", "forbidden", "private"])
def test_dependencies_run_one_way(rule):
    if rule == "layers":
        bad = [f"{s} -> {d}" for s, d, _ in EDGES if group(d) not in ALLOWED[group(s)]]
    elif rule == "stages":
        bad = [f"{s} -> {d}" for s, d, _ in EDGES
               if group(s) == group(d) == "stages" and s != d and d != "ms3_jax.stages"]
    elif rule == "forbidden":
        bad = [f"{s} -> {d}" for s, d, _ in EDGES
               for a, b in FORBIDDEN if s.startswith(a) and d == b]
    else:
        bad = [f"{s}: from {d} import {n}" for s, d, names in EDGES for n in names if n.startswith("_")]
        bad += [f"{m}: {u}" for m, p in MODULES.items() for u in private_uses(p)]
    assert not bad, f"forbidden imports ({rule}):\n  " + "\n  ".join(bad)


def test_the_rule_catches_a_forbidden_edge():
    """The checks above see edges: a stage importing another stage is one (made up here)."""
    src = "from ms3_jax.stages import pretrain\n"
    tree = ast.parse(src)
    node = tree.body[0]
    assert f"{node.module}.{node.names[0].name}" in MODULES
    assert group("ms3_jax.stages.pretrain") == "stages" and group("ms3_jax.export") == "tools"
    assert "stages" not in ALLOWED["engine"] and "testing" not in ALLOWED["tools"]


def test_design_doc_lists_every_module():
    """docs/design.md's layout names every module of the package (folder and file)."""
    layout = (PACKAGE.parent / "docs" / "design.md").read_text().split("## Layout", 1)[1]
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" and not (
                   p.name in layout and (p.parent == PACKAGE or f"{p.parent.name}/" in layout))]
    assert not missing, f"modules missing from docs/design.md's layout: {missing}"
