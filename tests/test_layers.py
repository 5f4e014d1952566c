"""The package's imports run one way: no circle, and no module reaching into another's private names.

The modules are read with `ast`, never imported, so the test sees every import
(inside functions too) whatever is installed. See docs/architecture.md for
the layers these rules keep apart.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wsgate"

# An import under `if TYPE_CHECKING:` still counts as an edge of the graph, unless listed
# here with the reason it may close a circle (a type named in a signature, say, where the
# module that defines it must import this one at run time).
TYPE_CHECKING_ONLY: dict[tuple[str, str], str] = {}


# The core: sans-I/O modules that import nothing from the shell.
CORE = {
    "wsgate.errors",
    "wsgate.frames",
    "wsgate._speedups",  # the compiled fast path of frames
    "wsgate.handshake",
    "wsgate.heads",
    "wsgate.hashring",
    "wsgate.health",
    "wsgate.routing",
    "wsgate.proxy_protocol",
    "wsgate.forwarding",
    "wsgate.ratelimit",
    "wsgate.config",
    "wsgate.extended_connect",
    "wsgate.closing",
    "wsgate.explain",
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    names: tuple[str, ...] = ()
    type_checking: bool = False


@dataclass
class Package:
    """Every module of a package and the imports between its modules."""

    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    # (module, line, what): a private name of another module used as `module._name`.
    private_attributes: list[tuple[str, int, str]] = field(default_factory=list)
    # The private names each module defines (functions, classes, attributes, slots) ...
    defined: dict[str, set[str]] = field(default_factory=dict)
    # ... and the private attributes it reads or writes on any object: (name, line).
    used: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


def module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def in_core(module: str) -> bool:
    return any(module == core or module.startswith(core + ".") for core in CORE)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """The line numbers of the statements under `if TYPE_CHECKING:`."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for statement in node.body:
                    lines.update(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    return lines


def read_package(root: Path) -> Package:
    package = Package()
    for path in sorted(root.rglob("*.py")):
        package.modules[module_name(root, path)] = path
    for name, path in package.modules.items():
        _read_module(package, root.name, name, path)
    return package


def _defined_private(tree: ast.Module) -> set[str]:
    """The private names a module gives a meaning to, on itself or on its objects."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.rpartition(".")[2])
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries, getattr() names
    return {name for name in names if is_private(name)}


def _read_module(package: Package, top: str, name: str, path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    guarded = _type_checking_lines(tree)
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    bound: dict[str, str] = {}  # local name -> module of the package it stands for

    def add(imported: str, node: ast.stmt, names: tuple[str, ...] = ()) -> None:
        if imported != name:
            package.imports.append(Import(name, imported, node.lineno, names, node.lineno in guarded))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == top or alias.name.startswith(top + "."):
                    add(alias.name, node)
                    if alias.asname:
                        bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.rsplit(".", node.level - 1)[0] if node.level > 1 else own_package
                source = f"{base}.{node.module}" if node.module else base
            elif node.module and (node.module == top or node.module.startswith(top + ".")):
                source = node.module
            else:
                continue
            plain = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in package.modules:
                    add(submodule, node)  # `from . import frames` imports the module frames
                    bound[alias.asname or alias.name] = submodule
                else:
                    plain.append(alias.name)
            if plain or source not in package.modules:
                add(source, node, tuple(plain))
    package.defined[name] = _defined_private(tree)
    package.used[name] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in bound:
            if bound[node.value.id] != name:
                package.private_attributes.append((name, node.lineno, f"{bound[node.value.id]}.{node.attr}"))
        elif isinstance(node.ctx, ast.Load):
            package.used[name].append((node.attr, node.lineno))


def circles(package: Package) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), sorted."""
    graph: dict[str, set[str]] = {name: set() for name in package.modules}
    for edge in package.imports:
        if edge.type_checking and (edge.importer, edge.imported) in TYPE_CHECKING_ONLY:
            continue
        if edge.imported in graph:
            graph[edge.importer].add(edge.imported)
    # Tarjan's algorithm, iteratively: the package is small, but recursion limits are not ours.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


# Attributes a module reads from a third-party base class, that a wsgate module happens to
# define too: http2's frame buffer subclasses h2's and peeks at its buffer (`_data`).
FOREIGN_ATTRIBUTES = {("wsgate.http2", "_data")}


def private_imports(package: Package) -> list[str]:
    """`from .x import _name` and `x._name` across modules, as `importer:line: what`."""
    found = [
        f"{edge.importer}:{edge.line}: from {edge.imported} import {name}"
        for edge in package.imports
        for name in edge.names
        if is_private(name)
    ]
    found += [f"{module}:{line}: {what}" for module, line, what in package.private_attributes]
    # `gateway._admit()`: an attribute the reading module never defines, that another does.
    for module, used in package.used.items():
        own = package.defined[module]
        for attribute, line in used:
            owners = sorted(other for other, names in package.defined.items() if attribute in names)
            if attribute not in own and owners and (module, attribute) not in FOREIGN_ATTRIBUTES:
                found.append(f"{module}:{line}: .{attribute} of {', '.join(owners)}")
    return sorted(set(found))


@pytest.fixture(scope="module")
def wsgate_package() -> Package:
    return read_package(PACKAGE)


def test_the_reader_sees_the_package(wsgate_package):
    # A reader that found nothing would pass every rule below.
    assert {"wsgate.upgrade", "wsgate.books", "wsgate.gateway", "wsgate.relay"} <= set(wsgate_package.modules)
    edges = {(edge.importer, edge.imported) for edge in wsgate_package.imports}
    assert ("wsgate.upgrade", "wsgate.books") in edges
    assert ("wsgate.gateway", "wsgate.upgrade") in edges
    assert ("wsgate.frames", "wsgate.errors") in edges  # an absolute import


def test_no_import_circle(wsgate_package):
    assert circles(wsgate_package) == []


def test_no_module_uses_another_modules_private_names(wsgate_package):
    assert private_imports(wsgate_package) == []


def test_every_type_checking_exception_is_still_a_type_checking_import(wsgate_package):
    guarded = {(edge.importer, edge.imported) for edge in wsgate_package.imports if edge.type_checking}
    assert set(TYPE_CHECKING_ONLY) <= guarded


def test_the_core_imports_nothing_from_the_shell(wsgate_package):
    reaching_out = sorted(
        f"{edge.importer}:{edge.line}: {edge.imported}"
        for edge in wsgate_package.imports
        if in_core(edge.importer) and edge.imported != "wsgate" and not in_core(edge.imported)
    )
    assert reaching_out == []


@pytest.mark.parametrize(
    ("module", "never"),
    [
        # The upgrade phase shares state with the gateway only through the books.
        ("wsgate.upgrade", "wsgate.gateway"),
        ("wsgate.upstream", "wsgate.gateway"),
        ("wsgate.books", "wsgate.gateway"),
        ("wsgate.books", "wsgate.upgrade"),
        ("wsgate.relay", "wsgate.books"),
    ],
)
def test_the_upgrade_phase_and_the_gateway_meet_only_in_the_books(wsgate_package, module, never):
    imports = wsgate_package.imports
    lines = [edge.line for edge in imports if (edge.importer, edge.imported) == (module, never)]
    assert lines == []


# -- the rules themselves, on a package made for the purpose ------------------------------


def write_package(root: Path, modules: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, source in {"__init__": "", **modules}.items():
        path = package / f"{name.replace('.', '/')}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return package


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    package = read_package(write_package(tmp_path, {
        "a": "from .b import thing\n",
        "b": "def late():\n    from . import c\n",
        "c": "import pkg.a\n",
        "d": "from .a import thing\n",
    }))
    assert circles(package) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_type_checking_import_closes_a_circle_unless_it_is_listed(tmp_path, monkeypatch):
    package = read_package(write_package(tmp_path, {
        "a": "from .b import B\n",
        "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n",
    }))
    assert circles(package) == [["pkg.a", "pkg.b"]]
    monkeypatch.setitem(TYPE_CHECKING_ONLY, ("pkg.b", "pkg.a"), "b names A in a signature")
    assert circles(package) == []


def test_private_names_of_another_module_are_found(tmp_path):
    package = read_package(write_package(tmp_path, {
        "a": "_secret = 1\n__all__ = ['x']\n",
        "b": "from .a import _secret, __all__\n",
        "c": "from . import a\nvalue = a._secret\nfrom .sub import mod\nmod._hidden()\n",
        "sub.mod": "def _hidden(): pass\n_hidden()\n",
        "gate": "class Gate:\n    def _admit(self): return self._count\n    _count = 0\n",
        "door": (
            "class Door:\n    def __init__(self, gate):\n        gate._admit()\n        self._own = gate\n"
            "    def peek(self):\n        return self._own, self.gate._count, self._elsewhere\n"
        ),
    }))
    assert private_imports(package) == [
        "pkg.b:1: from pkg.a import _secret",
        "pkg.c:2: pkg.a._secret",
        "pkg.c:4: pkg.sub.mod._hidden",
        "pkg.door:3: ._admit of pkg.gate",
        "pkg.door:6: ._count of pkg.gate",
    ]
