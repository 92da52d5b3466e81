"""The layout's promises, checked on the source: no import cycle, no private use of libraries.

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency), and under ``TYPE_CHECKING`` too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlops"
# the one module allowed to touch a library's private (underscore) names; see its docstring
ADAPTER = PACKAGE / "serving" / "adapter.py"
LIBRARIES = ("mlflow", "starlette", "sklearn")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``mlops`` modules that module ``name`` imports (anywhere in its body)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # "from mlops import data" names the module mlops.data; "from mlops.x import f" names
            # mlops.x
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        edges = _imports(name, path, known)
        # importing a.b.c runs a/__init__ and a/b/__init__ first; a module's own packages are
        # already being imported when it runs, so they are no edge of its own
        own = set(_parents(name))
        graph[name] = {
            e
            for e in edges | {p for e in edges for p in _parents(e) if p in known}
            if e not in own and e != name
        }
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert len(graph) > 20, "the walk found too few modules to be meaningful"
    assert "mlops.registry.gates" in graph["mlops.registry.promotion"]  # the walk sees real edges
    assert _cycles(graph) == []


def test_cycle_detection_finds_a_known_cycle() -> None:
    # the checker itself must be able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


_PRIVATE = re.compile(r"^_[A-Za-z]")


def _private_uses(path: Path) -> list[str]:
    """``lib._name`` attributes, ``from lib.x import _name`` and ``"_name"`` looked up on
    objects."""
    tree = ast.parse(path.read_text(), str(path))
    library_names: set[str] = set()
    hits: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    library_names.add((alias.asname or alias.name).split(".")[0])
                    if any(_PRIVATE.match(p) for p in alias.name.split(".")):
                        hits.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
            for alias in node.names:
                if _PRIVATE.match(alias.name) or any(
                    _PRIVATE.match(p) for p in (node.module or "").split(".")
                ):
                    hits.append(f"{path.name}:{node.lineno} from {node.module} import {alias.name}")
                library_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _PRIVATE.match(node.attr)
            and not node.attr.startswith("__")
        ):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in library_names:
                hits.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
        # getattr(obj, "_private") is the same reach, spelled as a string
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _PRIVATE.match(node.args[1].value)
        ):
            hits.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return hits


def test_no_private_library_names_outside_the_adapter() -> None:
    offenders = {
        str(p.relative_to(PACKAGE)): _private_uses(p) for p in PACKAGE.rglob("*.py") if p != ADAPTER
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert _private_uses(ADAPTER), (
        "the adapter is where the private uses live; the scan must see them"
    )


def test_private_use_scan_catches_each_spelling(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import mlflow\nfrom sklearn.base import _private\nfrom mlflow.pyfunc import "
        "scoring_server\n"
        "x = mlflow.pyfunc._model_impl\ny = getattr(model, '_model_impl')\nz = scoring_server._x\n"
    )
    assert len(_private_uses(sample)) == 4


def test_setup_cfg_lists_every_package() -> None:
    """setup.cfg names the packages (conf/ is mapped in as mlops.conf): a new one must be added
    there."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(PACKAGE.parent / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed and listed - found == {"mlops.conf"}


def test_wheel_ships_the_default_config(tmp_path: Path) -> None:
    """A non-editable install finds conf/: the wheel holds it as mlops/conf."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(PACKAGE.parent),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("mlops-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "mlops/conf/default.yaml",
        "mlops/conf/models/logreg.yaml",
        "mlops/conf/search_spaces/logreg.yaml",
        "mlops/registry/promotion.py",
        "mlops/serving/model_code.py",
    } <= names
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import mlops.config as c; cfg = c.load_config(); "
        "print(c.conf_dir(), cfg.model.params['max_iter'])"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(target / "mlops" / "conf"), "1000"]


def test_the_dead_names_the_review_found_are_gone() -> None:
    import mlops.errors
    import mlops.monitoring.logger
    import mlops.registry.gates

    assert not hasattr(mlops.errors, "InvalidRequest") and not hasattr(
        mlops.errors, "TrainingError"
    )
    assert not hasattr(mlops.registry.gates, "describe")
    logger_class = mlops.monitoring.logger.PredictionLogger
    assert not hasattr(logger_class, "buffered")
    # a running count of written rows is kept only because a server's /metrics reads it
    if "written_total" in logger_class.__init__.__code__.co_names:
        readers = [
            p
            for p in PACKAGE.rglob("*.py")
            if p.name != "logger.py" and "written_total" in p.read_text()
        ]
        assert readers, "PredictionLogger.written_total is kept but nothing reads it"
