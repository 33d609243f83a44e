"""The package layout holds: layers without import circles, torch-free lower stages, modest modules.

Every ``import autoseg...`` in the package is read from the source (module level and inside
functions alike; imports under ``if TYPE_CHECKING:`` are annotations only and do not count).
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoseg"

#: Top-level units (a package or a module directly under autoseg/) from the bottom up. A unit may
#: import units of its own or lower layers only, so no circle between them can form. Keep in step
#: with the layering in DESIGN.md §4 and docs/architecture.md.
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(layer.split()) for layer in (
    "errors _version",
    "atomic channels device regions metrics image_metrics processes",
    "imageio checkpoint crossval plans",
    "dataset",                                          # layout discovery, scan, check, fingerprint
    "planning preprocessing networks data convert overlay examples",
    "distributed tasks",                                # process launcher; the task seam
    "evaluation",                                       # scoring files, postprocessing, find-best, ensemble
    "inference",                                        # models, inputs, predictor, export, the predict run
    "simulate",                                         # restoration pairs (reads DICOM series as predict does)
    "training",                                         # the loop, DDP, fold validation (uses the predictor)
    "demo demo_denoise",
    "cli",
    "__main__",
    "__init__",                                         # the facade: autoseg.Segmenter, autoseg.__version__
))
#: Units that must never import torch, not even inside a function (fast start, easy tests).
TORCH_FREE = ("dataset", "planning", "plans", "channels", "metrics", "image_metrics", "processes", "evaluation", "errors", "atomic",
              "regions", "crossval", "_version")
#: Modules allowed over MAX_LINES, and why.
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 600


def _layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"autoseg/{unit}: not in LAYERS of {__file__}; place it in a layer")


def _unit(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 or relative.name != "__init__.py" \
        else "__init__"


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` of every runtime import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    annotation_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            annotation_only.update(id(n) for sub in node.body for n in ast.walk(sub))
    for node in ast.walk(tree):
        if id(node) in annotation_only:
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "autoseg":
                yield from ((f"autoseg.{alias.name}", node.lineno) for alias in node.names)
            else:
                yield node.module, node.lineno


def _target_unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "autoseg":
        return None
    if len(parts) == 1 or parts[1] == "__version__":
        return "__init__"  # the facade, at the top: below it, import autoseg._version
    return parts[1]


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "examples" not in p.relative_to(PACKAGE).parts)


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for path in _sources():
        unit = _unit(path)
        for module, line in _imports(path):
            target = _target_unit(module)
            if target is not None and target != unit and _layer_of(target) > _layer_of(unit):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({unit}) imports {module} ({target}, a "
                             "higher layer)")
    assert not wrong, "\n".join(wrong)


def test_lower_stages_never_import_torch() -> None:
    wrong = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
             for path in _sources() if _unit(path) in TORCH_FREE
             for module, line in _imports(path) if module.split(".")[0] == "torch"]
    assert not wrong, "\n".join(wrong)


def test_modules_stay_readable() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    unexplained = {name: n for name, n in long.items() if name not in LONG_MODULES}
    assert not unexplained, f"modules over {MAX_LINES} lines without a reason in LONG_MODULES: {unexplained}"
    stale = set(LONG_MODULES) - set(long)
    assert not stale, f"LONG_MODULES lists modules that are short now: {stale}"


@pytest.mark.parametrize("unit", sorted({u for layer in LAYERS for u in layer}))
def test_every_layer_unit_exists(unit: str) -> None:
    assert unit in {"__init__", "__main__"} or (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").is_file(), \
        f"LAYERS names autoseg/{unit}, which does not exist"


_DOCUMENTS = ("README.md", "docs", "benchmarks/README.md")
_PATH_REFERENCE = re.compile(r"autoseg(?:/[A-Za-z_0-9.]+)+")
_MODULE_REFERENCE = re.compile(r"`(autoseg(?:\.[A-Za-z_][A-Za-z_0-9]*)+)")


def _documents() -> list[Path]:
    root = PACKAGE.parent
    return sorted(p for name in _DOCUMENTS for p in ([root / name] if name.endswith(".md") else
                                                      (root / name).glob("*.md")))


def _resolves(dotted: str) -> bool:
    """A module, or an attribute path below the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_documents_name_only_paths_and_modules_that_exist() -> None:
    root = PACKAGE.parent
    missing = []
    for doc in _documents():
        text = doc.read_text(encoding="utf-8")
        for path in _PATH_REFERENCE.findall(text):
            # "then autoseg/predict_cpu.py": a historical name, said as such.
            if not (root / path.rstrip(".")).exists() and f"then `{path}`" not in text:
                missing.append(f"{doc.relative_to(root)}: {path}")
        missing += [f"{doc.relative_to(root)}: {name}" for name in _MODULE_REFERENCE.findall(text)
                    if not _resolves(name)]
    assert not missing, "documents point at what does not exist:\n" + "\n".join(missing)
