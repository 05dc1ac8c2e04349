"""The layer order of docs/architecture.md, checked on every module's imports (parsed with ``ast``, so lazy imports
inside functions and ``TYPE_CHECKING`` imports count too): no layer imports one above it, and the layers that run
in a plain Python process import no Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dgserve"

# Bottom to top: each layer may import the layers before it. ``kernels`` (Triton) is below the model that calls
# them. ``train`` sits beside ``config`` (model + engine, used only by the CLI).
ORDER = ("kernels", "model", "engine", "config", "cluster", "replicas", "routing", "deploy")
ALLOWED = {layer: set(ORDER[:i]) for i, layer in enumerate(ORDER)}
ALLOWED["train"] = {"kernels", "model", "engine"}
ALLOWED["deploy"] |= {"train"}
NO_RAY = ("kernels", "model", "engine", "config", "train")


def _layer(module: str) -> str | None:
    """``dgserve.engine.kv_pages`` -> ``engine``; ``dgserve.config`` -> ``config``; the package itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "dgserve" and len(parts) > 1 else None


def _module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # ``from dgserve import config`` imports the module dgserve.config
            if name == "dgserve":
                out.extend((node.lineno, f"dgserve.{alias.name}") for alias in node.names)
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(_module_name(p)) is not None)


def test_every_module_belongs_to_a_known_layer():
    unknown = {_layer(_module_name(p)) for p in MODULES} - set(ALLOWED)
    assert not unknown, f"packages without a place in the layer order: {sorted(unknown)} (add them to ALLOWED)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_upward_imports(path):
    layer = _layer(_module_name(path))
    bad = [f"line {line}: {name}" for line, name in _imports(path)
           if (target := _layer(name)) is not None and target != layer and target not in ALLOWED[layer]]
    assert not bad, f"{layer}/ may import only {sorted(ALLOWED[layer])}; found: {bad}"


@pytest.mark.parametrize("path", [p for p in MODULES if _layer(_module_name(p)) in NO_RAY],
                         ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_plain_python_layers_do_not_import_ray(path):
    bad = [f"line {line}: {name}" for line, name in _imports(path) if name == "ray" or name.startswith("ray.")]
    assert not bad, f"{_layer(_module_name(path))}/ runs without Ray; found: {bad}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The parser resolves absolute, relative and lazy imports (a check that cannot fail proves nothing)."""
    pkg = tmp_path / "dgserve" / "engine"
    pkg.mkdir(parents=True)
    (tmp_path / "dgserve" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    probe = pkg / "probe.py"
    probe.write_text("from ..routing import app\n\n\ndef f():\n    import dgserve.deploy.cli\n"
                     "    from dgserve import config\n")
    names = [name for _, name in _imports(probe, root=tmp_path)]
    assert names == ["dgserve.routing", "dgserve.deploy.cli", "dgserve", "dgserve.config"]
    assert {_layer(n) for n in names} - {None} - ALLOWED["engine"] == {"routing", "deploy", "config"}
