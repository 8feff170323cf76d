"""Layout rules: every package is installed, untrusted code never imports trusted code, stubs are current.

The trust boundary is checked twice:

- **statically**, over every module of every folder (all import forms: ``import a.b``, ``from a import
  b``, relative imports, ``from bifrost import tee``, and module names passed to ``importlib.import_module``
  or ``__import__``), against :data:`RULES`;
- **at run time**: a worker process started through its entry point (``python -m bifrost.worker``, as
  local workers are) and through ``bifrost worker``, and a process that imports the client SDK, have no
  ``bifrost.tee`` module loaded (and the client no torch either).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRUSTED = ("bifrost.tee",)

# folder (or file) -> module prefixes it must never import. bifrost/tee is trusted and bifrost/cli.py
# dispatches lazily (checked at run time below); estimator/calibrate.py and estimator/validate.py are the
# estimator's measurement harness: they run the trusted runtime on purpose, to time it.
RULES: dict[str, tuple[str, ...]] = {
    "bifrost/worker": TRUSTED + ("bifrost.serve",),
    "bifrost/serve": TRUSTED + ("bifrost.worker.service",),
    "bifrost/ckks": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "bifrost/model": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "bifrost/proto": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "bifrost/attest": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "bifrost/__init__.py": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "bifrost/config.py": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "bifrost/config_loader.py": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "bifrost/yaml_io.py": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "bifrost/errors.py": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "kernels": TRUSTED + ("bifrost.serve", "bifrost.worker"),
    "estimator": TRUSTED,
}
HARNESS = {"estimator/calibrate.py", "estimator/validate.py"}


def _declared_packages() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"packages = \[(.*?)\]", text, re.S).group(1)
    return set(re.findall(r'"([\w.]+)"', block))


def test_every_package_folder_is_listed_in_pyproject():
    declared = _declared_packages()
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bifrost").rglob("__init__.py")}
    found |= {"bifrost_kernels", "bifrost_estimator"}
    assert found <= declared, f"missing from pyproject: {sorted(found - declared)}"


def _package(path: Path, root: Path = ROOT) -> str:
    """The import name of ``path``'s package (kernels/ and estimator/ install as bifrost_kernels/_estimator)."""
    parts = list(path.relative_to(root).with_suffix("").parts[:-1])
    if parts and parts[0] in ("kernels", "estimator"):
        parts[0] = "bifrost_" + parts[0]
    return ".".join(parts)


def imported_names(source: str, package: str) -> set[str]:
    """Every module name ``source`` imports, in any form (``from a import b`` yields a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for target, banned in RULES.items():
        paths = [root / target] if target.endswith(".py") else sorted((root / target).rglob("*.py"))
        for path in (p for p in paths if p.is_file()):
            rel = str(path.relative_to(root))
            if rel in HARNESS:
                continue
            bad = {n for n in imported_names(path.read_text(), _package(path, root))
                   if any(n == b or n.startswith(b + ".") for b in banned)}
            if bad:
                found.append(f"{rel} imports {sorted(bad)}")
    return found


def test_untrusted_and_shared_code_never_imports_trusted_code():
    assert violations() == []


@pytest.mark.parametrize("source, package, expected", [
    ("import bifrost.tee.runtime", "bifrost.worker", "bifrost.tee.runtime"),
    ("from bifrost import tee", "bifrost.worker", "bifrost.tee"),
    ("from ..tee import replica", "bifrost.serve", "bifrost.tee.replica"),
    ("from .. import tee", "bifrost.serve", "bifrost.tee"),
    ("import importlib\nimportlib.import_module('bifrost.tee.cli')", "bifrost.worker", "bifrost.tee.cli"),
    ("def f():\n    from bifrost.tee.engine import DelegationEngine", "bifrost.serve", "bifrost.tee.engine"),
])
def test_the_static_check_sees_every_import_form(source, package, expected):
    assert expected in imported_names(source, package)


def test_the_static_check_flags_a_planted_violation(tmp_path):
    """A copy of the tree with one untrusted module importing trusted code fails the rule."""
    for folder in ("bifrost/worker", "bifrost/serve"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "bifrost/worker/service.py").write_text("from bifrost import tee  # planted\n")
    (tmp_path / "bifrost/serve/client.py").write_text("from ..tee.replica import TrustedReplica  # planted\n")
    assert sorted(violations(tmp_path)) == [
        "bifrost/serve/client.py imports ['bifrost.tee.replica', 'bifrost.tee.replica.TrustedReplica']",
        "bifrost/worker/service.py imports ['bifrost.tee']"]


# --------------------------------------------------------------------------- import cycles

IMPORT_ROOTS = {"bifrost": "bifrost", "bifrost_kernels": "kernels"}  # import name -> folder


def _modules(root: Path) -> dict[str, Path]:
    """Every module of ``bifrost`` and ``bifrost_kernels`` under ``root``, by import name (a package by its own name)."""
    found = {}
    for name, folder in IMPORT_ROOTS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def _module_imports(source: str, package: str, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``source`` imports anywhere (:func:`imported_names`, functions included),
    each name resolved to its longest prefix in ``modules``."""
    resolved = set()
    for name in imported_names(source, package):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            resolved.add(name)
    return resolved


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules it imports, over ``bifrost`` and ``bifrost_kernels`` (a package's ``__init__`` is the
    package's own node, so an ``__init__`` importing its submodules is an edge). Importing ``a.b.c`` also runs
    the ``__init__`` of ``a.b`` and ``a``: each is an edge too, unless it is a package of the importer itself."""
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = _module_imports(path.read_text(), package, modules)
        own = set(_ancestors(name))  # initialised before this module runs: never a dependency it can cycle through
        graph[name] = {m for t in targets for m in (t, *_ancestors(t)) if m in modules and m not in own} - {name}
    return graph


def _ancestors(module: str) -> list[str]:
    """The packages whose ``__init__`` runs before ``module`` does: a.b.c -> [a.b, a]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_bifrost_and_its_kernels_have_no_import_cycle():
    graph = import_graph()
    assert "bifrost.config_loader" in graph["bifrost.tee.runtime"]  # the graph sees real imports
    assert "bifrost.attest.snp" in graph["bifrost.attest.verdict"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    """A function-level import back to the importer, an ``__init__`` importing its submodule, and a cycle that
    closes only through a package's ``__init__`` (importing ``a.b.c`` runs ``a.b``'s) are cycles."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels/__init__.py").write_text("")
    (tmp_path / "bifrost/ckks").mkdir(parents=True)
    (tmp_path / "bifrost/__init__.py").write_text("")
    (tmp_path / "bifrost/ckks/__init__.py").write_text("from .backend import get_backend\n")
    (tmp_path / "bifrost/ckks/params.py").write_text("")
    (tmp_path / "bifrost/ckks/backend.py").write_text("def get_backend():\n    from bifrost_kernels import native\n")

    def cycle_through(native_source: str) -> list[str] | None:
        (tmp_path / "kernels/native.py").write_text(native_source)
        cycle = find_cycle(import_graph(tmp_path))
        assert cycle is None or (cycle[0] == cycle[-1] and "bifrost_kernels.native" in cycle)
        return cycle

    assert set(cycle_through("from bifrost.ckks import backend\n")) >= {"bifrost.ckks.backend", "bifrost_kernels.native"}
    assert set(cycle_through("import bifrost.ckks\n")) == {"bifrost.ckks", "bifrost.ckks.backend", "bifrost_kernels.native"}
    # params imports nothing, but importing it runs bifrost/ckks/__init__, which imports backend
    assert set(cycle_through("from bifrost.ckks.params import x\n")) == {"bifrost.ckks", "bifrost.ckks.backend",
                                                                         "bifrost_kernels.native"}
    assert cycle_through("import numpy\n") is None


# --------------------------------------------------------------------------- run time

# Runs a module as ``python -m`` does (argv after the dump path) and, when the process exits, writes the
# names of every module it had loaded to the dump file. (``-X importtime`` misses ``importlib`` imports.)
_RUN_AND_DUMP = ("import atexit, runpy, sys\n"
                 "dump, module = sys.argv[1], sys.argv[2]\n"
                 "atexit.register(lambda: open(dump, 'w').write('\\n'.join(sorted(sys.modules))))\n"
                 "sys.argv = [module, *sys.argv[3:]]\n"
                 "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


def _trusted_or_torch(modules) -> list[str]:
    return sorted(m for m in modules if m.startswith(TRUSTED) or m.split(".")[0] == "torch")


@pytest.mark.parametrize("entry", ["bifrost.worker", "bifrost.cli"])
def test_a_running_worker_process_has_no_trusted_module_loaded(run_config, tmp_path, monkeypatch, entry):
    """The worker serving over mutual TLS, started as local workers are (``python -m bifrost.worker``) and
    through ``bifrost worker``; its loaded modules are dumped when it exits."""
    from bifrost.attest.mtls import TRUSTED_TLS_NAME, TLSIdentity
    from bifrost.worker import launcher

    dump = tmp_path / "modules.txt"
    real_popen = subprocess.Popen

    def dumping(cmd, **kw):
        assert cmd[1:3] == ["-m", "bifrost.worker"]  # how the launcher starts a worker
        args = ["worker", *cmd[3:]] if entry == "bifrost.cli" else cmd[3:]
        return real_popen([cmd[0], "-c", _RUN_AND_DUMP, str(dump), entry, *args], **kw)

    monkeypatch.setattr(launcher.subprocess, "Popen", dumping)
    client = TLSIdentity.generate(TRUSTED_TLS_NAME)
    with launcher.LocalWorker("gpt2-mini", run_config.seed, [client.cert_pem], log_path=str(tmp_path / "log")) as w:
        assert w.address  # it served
    modules = dump.read_text().split()
    assert "bifrost.worker.service" in modules and "grpc" in modules  # the dump really lists what it loaded
    assert [m for m in _trusted_or_torch(modules) if m.startswith(TRUSTED)] == []


@pytest.mark.parametrize("code", ["import bifrost.serve.client", "import bifrost.serve.cli",
                                  "import bifrost.serve.proxy", "import bifrost.serve.proxy_cli"])
def test_the_client_sdk_loads_neither_trusted_code_nor_torch(code):
    out = subprocess.run([sys.executable, "-c", f"import sys; {code}; print(sorted(sys.modules))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    modules = eval(out.stdout)  # noqa: S307 - our own subprocess's repr of a list of names
    assert code.split()[1] in modules and _trusted_or_torch(modules) == []


def test_bifrost_chat_through_the_cli_loads_no_trusted_code(tmp_path):
    dump = tmp_path / "modules.txt"
    out = subprocess.run([sys.executable, "-c", _RUN_AND_DUMP, str(dump), "bifrost.cli", "chat", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--policy" in out.stdout
    modules = dump.read_text().split()
    assert "bifrost.serve.cli" in modules and _trusted_or_torch(modules) == []


def test_bifrost_proxy_through_the_cli_loads_no_trusted_code(tmp_path):
    dump = tmp_path / "modules.txt"
    out = subprocess.run([sys.executable, "-c", _RUN_AND_DUMP, str(dump), "bifrost.cli", "proxy", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--policy" in out.stdout and "--sessions" in out.stdout
    modules = dump.read_text().split()
    assert "bifrost.serve.proxy_cli" in modules and _trusted_or_torch(modules) == []


def test_committed_grpc_stubs_match_the_proto_files(tmp_path):
    from bifrost.proto.generate import generate

    for new in generate(tmp_path):
        committed = ROOT / new.relative_to(tmp_path)
        assert committed.read_text() == new.read_text(), f"{committed} is stale: run `make proto`"


def test_source_tree_kernels_folder_imported_by_another_name_registers_nothing(monkeypatch):
    """transformers imports any top-level ``kernels`` it finds (HF hub kernels probe); from the repo root
    that is this folder. The native backend must still come from the installed ``bifrost_kernels``."""
    import importlib

    from bifrost.ckks.registry import get_backend

    get_backend("native")
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    importlib.import_module("kernels")
    assert type(get_backend("native")).__module__ == "bifrost_kernels.backend"
