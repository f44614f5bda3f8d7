"""The package's shape: imports run one way through the layers, without cycles; argparse, vLLM and sockets each
stay in their one place; no module is over 400 lines. Read from the source (``ast``), nothing is imported."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zdyn"
MAX_LINES = 400  # zdyn's modules
MAX_BENCHMARK_LINES = 440  # a benchmark script: "at most ~400 lines" (issue 9)

# Top to bottom: a module imports only from its own layer or the layers below it (README, "Architecture").
LAYERS: list[tuple[str, set[str]]] = [
    ("entry points", {"cli", "roles", "bench"}),
    ("the roles' library classes", {"frontend", "processor", "choice", "admission", "worker"}),
    (
        "routing, disaggregation, engines",
        {"router", "disagg", "engines", "detokenizer", "prompt_encoder", "tools", "models"},
    ),
    ("streaming RPC", {"rpc", "kv_events", "kv_state", "kv_publisher"}),
    ("transport", {"transport", "security"}),
    ("messages", {"protocol", "token_ids", "errors", "__init__"}),
]
ARGPARSE_ALLOWED = ("zdyn.roles", "zdyn.cli", "zdyn.bench")
VLLM_ALLOWED = ("zdyn.engines.vllm",)
# zdyn.bench's zmq_pair and zmq_servers measure bare pyzmq, the baseline zdyn's transport is compared with.
SOCKETS_ALLOWED = ("zdyn.transport", "zdyn.bench")


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    top: set[str] = field(default_factory=set)  # zdyn modules imported when this one is
    lazy: set[str] = field(default_factory=set)  # ... inside functions or TYPE_CHECKING blocks
    external: set[str] = field(default_factory=set)  # other top-level packages, wherever imported


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        modules[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    for module in modules.values():
        for node, lazy in imports(module.tree):
            for target in targets(node, module, modules):
                if target.startswith("zdyn"):
                    (module.lazy if lazy else module.top).add(target)
                else:
                    module.external.add(target.split(".")[0])
    return modules


def imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import, and whether it runs later than the module's own import (functions, TYPE_CHECKING).
    What runs only as ``python -m`` (``if __name__ == "__main__":``) is not an import of the module."""

    def walk(nodes: list[ast.stmt], lazy: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node, lazy
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if test == "__name__ == '__main__'":
                    continue
                yield from walk(node.body, lazy or "TYPE_CHECKING" in test)
                yield from walk(node.orelse, lazy)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from walk(node.body, True)
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, lazy)
            elif isinstance(node, ast.Try):
                for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                    yield from walk(block, lazy)
            elif isinstance(node, ast.With | ast.AsyncWith | ast.For | ast.AsyncFor | ast.While):
                yield from walk(node.body, lazy)

    yield from walk(tree.body, False)


def targets(node: ast.Import | ast.ImportFrom, module: Module, modules: dict[str, Module]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    return found if len(found) == len(node.names) else [*found, base]


def layer(name: str) -> int:
    part = name.split(".")[1] if "." in name else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if part in members:
            return index
    raise AssertionError(f"{name} belongs to no layer: add zdyn.{part} to tests/test_layers.py's LAYERS")


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return load()


def test_every_module_has_a_layer(modules: dict[str, Module]) -> None:
    for name in modules:
        layer(name)


def test_imports_run_downwards(modules: dict[str, Module]) -> None:
    upward = [
        f"{m.name} ({LAYERS[layer(m.name)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
        for m in modules.values()
        for t in sorted(m.top | m.lazy)
        if layer(t) < layer(m.name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles(modules: dict[str, Module]) -> None:
    graph = {name: {t for t in m.top if t in modules and t != name} for name, m in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_argparse_only_in_the_role_layer(modules: dict[str, Module]) -> None:
    users = [m.name for m in modules.values() if "argparse" in m.external and not within(m.name, ARGPARSE_ALLOWED)]
    assert not users, f"argparse outside {ARGPARSE_ALLOWED}: {users}"


def test_vllm_only_in_its_engine(modules: dict[str, Module]) -> None:
    users = [m.name for m in modules.values() if "vllm" in m.external and not within(m.name, VLLM_ALLOWED)]
    assert not users, f"vllm imported outside {VLLM_ALLOWED}: {users}"


def zmq_socket_calls(tree: ast.Module) -> list[int]:
    """Lines that make a ZeroMQ socket: ``<context>.socket(...)`` (not the standard library's ``socket.socket``)."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "socket"
        and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "socket")
    ]


def test_sockets_are_made_only_by_transport(modules: dict[str, Module]) -> None:
    found = [
        f"{m.path.relative_to(ROOT)}:{line}"
        for m in modules.values()
        if not within(m.name, SOCKETS_ALLOWED)
        for line in zmq_socket_calls(m.tree)
    ]
    assert not found, "sockets not made through zdyn.transport.make_socket:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("folder", "pattern", "limit"), [("zdyn", "**/*.py", MAX_LINES), ("benchmarks", "*.py", MAX_BENCHMARK_LINES)]
)
def test_no_module_over_the_limit(folder: str, pattern: str, limit: int) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / folder).glob(pattern))
        if (n := len(p.read_text().splitlines())) > limit
    }
    assert not long, f"modules over {limit} lines: {long}"


def test_the_checks_see_what_they_check(modules: dict[str, Module]) -> None:
    """The checks would fail on a violation: each rule sees a module it allows."""
    assert "argparse" in modules["zdyn.roles.common"].external
    assert any("vllm" in m.external for m in modules.values() if within(m.name, VLLM_ALLOWED))
    assert zmq_socket_calls(modules["zdyn.transport"].tree)
    assert "zdyn.protocol" in modules["zdyn.transport"].top
    assert "zdyn.roles" in modules["zdyn.cli"].top | modules["zdyn.cli"].lazy
    assert layer("zdyn.roles.worker") < layer("zdyn.worker") < layer("zdyn.router.core") < layer("zdyn.rpc.hub")
    assert layer("zdyn.rpc.hub") < layer("zdyn.transport") < layer("zdyn.protocol")
