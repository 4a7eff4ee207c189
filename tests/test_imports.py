"""Module structure: every module imports on its own, and the import graph has no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "freeanchor"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(source: str, name: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """freeanchor modules that `source` (module `name`) imports anywhere (also inside
    functions), except under `if TYPE_CHECKING:`; `from a import b` counts as a.b when that
    is a module."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1]
                                    + ([base] if base else []))  # fmt: skip
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        found.add(full)
                    elif base in modules:
                        found.add(base)
            visit(child)

    visit(ast.parse(source))
    found.discard(name)
    return found


def test_import_graph_has_no_cycle():
    modules = _modules()
    graph = {
        name: _imports(path.read_text(), name, path.name == "__init__.py", modules)
        for name, path in modules.items()
    }
    # The package itself imports freeanchor.config etc.; `import freeanchor.x` runs
    # freeanchor/__init__ first, which is Python's doing, not an edge of ours.
    assert "freeanchor.models.zoo" in graph and not graph["freeanchor.models.zoo"] - {
        "freeanchor.errors"
    }, "zoo.py must stay a leaf"
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := dfs(name)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_graph_sees_function_level_and_relative_imports():
    """The checker is not blind: imports inside functions count (the old cycle was one),
    `if TYPE_CHECKING:` imports do not."""
    modules = _modules()
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from freeanchor.models.detector import FreeAnchor\n"
        "def f():\n    from freeanchor.models.weights import download\n"
        "from . import anchors\n"
    )
    found = _imports(source, "freeanchor.models.backbone", False, modules)
    assert found == {"freeanchor.models.weights", "freeanchor.models.anchors"}


CHILD = r"""
import importlib, os, sys, traceback
# third-party libraries, loaded once before the forks (only freeanchor must be fresh)
for lib in ("numpy", "torch", "torchvision", "PIL.Image", "cv2", "safetensors.torch", "tqdm",
            "matplotlib.pyplot", "pycocotools.coco", "faster_coco_eval", "onnx", "onnxruntime",
            "torch.utils.tensorboard"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
names = sys.argv[1:]
assert not any(m == "freeanchor" or m.startswith("freeanchor.") for m in sys.modules)
failed = 0
for name in names:
    pid = os.fork()
    if pid == 0:  # a child that has never imported freeanchor: imports `name` alone
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed += 1
        print(f"FAILED: import {name}", flush=True)
print(f"{len(names) - failed} of {len(names)} modules import on their own")
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    names = sorted(n for n in _modules() if n != "freeanchor.__main__")  # that one runs the CLI
    env_path = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *names],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": env_path},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(names)} of {len(names)} modules import on their own" in proc.stdout


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)  # fmt: skip


def test_import_freeanchor_and_the_parser_import_no_torch():
    """`import freeanchor`, `--help` and `--version` stay light; the heavy names still come
    on first use."""
    run = _python(
        "import sys, contextlib, io, freeanchor\n"
        "from freeanchor.cli import main\n"
        "for argv in (['--help'], ['predict', '--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n            main(argv)\n        except SystemExit:\n            pass\n"
        "heavy = [m for m in ('torch', 'torchvision', 'numpy', 'cv2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert freeanchor.FreeAnchorLoss.__module__ == 'freeanchor.models.loss'\n"
        "assert 'torch' in sys.modules\n"
        "print(sorted(n for n in freeanchor.__all__ if not hasattr(freeanchor, n)))\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"  # every public name resolves


def test_version_one_place_and_the_command_prints_it():
    import tomllib

    import freeanchor

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "freeanchor.version.__version__"
    }
    assert freeanchor.__version__.count(".") >= 2
    run = _python("from freeanchor.cli import main; main(['--version'])")
    assert run.returncode == 0 and run.stdout.strip() == f"freeanchor {freeanchor.__version__}"
    run = subprocess.run([sys.executable, "-m", "freeanchor", "--version"], capture_output=True,
                         text=True, cwd=ROOT, env={**__import__("os").environ,
                                                   "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert run.stdout.strip() == f"freeanchor {freeanchor.__version__}"


def test_unknown_attribute_is_an_attribute_error():
    import freeanchor

    with __import__("pytest").raises(AttributeError, match="no attribute 'nope'"):
        freeanchor.nope  # noqa: B018
