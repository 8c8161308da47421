"""The package's structure, read from its source: imports that go round in no circle, and the bytes of each
format known to its codec alone (``_torch_save.py``, ``_safetensors.py``)."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set, Tuple

from helpers import REPO

PACKAGE = "dcp_filesystem"
SOURCE = os.path.join(REPO, PACKAGE)


def _parse(file_name: str) -> ast.Module:
    with open(os.path.join(SOURCE, file_name), encoding="utf-8") as f:
        return ast.parse(f.read(), file_name)


def sources() -> Dict[str, ast.Module]:
    """Module name (``__init__`` for the package itself) -> its syntax tree."""
    return {name[: -len(".py")]: _parse(name) for name in sorted(os.listdir(SOURCE)) if name.endswith(".py")}


# --------------------------------------------------------------------------- the import graph


def _with_functions(tree: ast.AST, function: Optional[str] = None):
    """Every node of ``tree`` with the name of the function it is in (None at module or class level)."""
    for child in ast.iter_child_nodes(tree):
        yield child, function
        inside = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
        yield from _with_functions(child, inside)


def imported_modules(node: ast.AST, modules: Set[str]) -> List[str]:
    """The package's modules an import statement imports: ``from . import x``, ``from .x import y``,
    ``from dcp_filesystem.x import y``, ``import dcp_filesystem.x``; the package's own names (``from . import
    FileSystemWriter``) are its ``__init__``."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 0 and (node.module or "").split(".")[0] != PACKAGE:
            return []
        if node.level > 1:
            raise AssertionError(f"an import from above the package: line {node.lineno}")
        parts = (node.module or "").split(".")
        module = parts[1] if node.level == 0 and len(parts) > 1 else parts[0] if node.level == 1 else ""
        if module:
            return [module]
        return sorted({alias.name if alias.name in modules else "__init__" for alias in node.names})
    if isinstance(node, ast.Import):
        found = []
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == PACKAGE:
                found.append(parts[1] if len(parts) > 1 else "__init__")
        return found
    return []


def import_graph() -> Dict[str, Dict[str, Optional[str]]]:
    """Module -> {module it imports: None where at module level, else the function it is imported in}."""
    trees = sources()
    graph: Dict[str, Dict[str, Optional[str]]] = {name: {} for name in trees}
    for name, tree in trees.items():
        for node, function in _with_functions(tree):
            for imported in imported_modules(node, set(trees)):
                assert imported in trees, f"{name}.py imports {imported}, which is no module of the package"
                if imported != name and (imported not in graph[name] or graph[name][imported] is not None):
                    graph[name][imported] = function
    return graph


def cycles(graph: Dict[str, Dict[str, Optional[str]]]) -> List[List[str]]:
    """One cycle through each group of modules that import each other (strongly connected components),
    as the list of its modules, first repeated at the end."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    groups: List[List[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for group in groups:
        start, members = group[0], set(group)
        # The shortest way back to start, through the group (breadth first).
        paths = {w: [start, w] for w in graph[start] if w in members}
        queue = list(paths)
        while start not in paths:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        found.append(paths[start])
    return sorted(found)


def describe_cycle(graph: Dict[str, Dict[str, Optional[str]]], cycle: List[str]) -> str:
    steps = [cycle[0]]
    for a, b in zip(cycle, cycle[1:]):
        function = graph[a][b]
        steps.append(f"{b}" if function is None else f"{b} (imported inside {a}.{function}())")
    return " -> ".join(steps)


def test_the_cycle_finder_names_each_circle_and_where_it_is_imported():
    graph = {
        "a": {"b": None},
        "b": {"c": "check"},
        "c": {"a": None, "d": None},
        "d": {},
        "e": {"f": None},
        "f": {"e": None},
    }
    assert [describe_cycle(graph, c) for c in cycles(graph)] == [
        "a -> b -> c (imported inside b.check()) -> a",
        "e -> f -> e",
    ]
    assert cycles({"a": {"b": None}, "b": {}}) == []


def test_imports_inside_functions_are_edges_of_the_graph():
    tree = ast.parse("from . import x\nfrom .y import z\ndef f():\n    from ._w import v\n    import dcp_filesystem.u\n"
                     "from . import Name\nimport os\nfrom os import path\n")
    found = [(imported_modules(node, {"x", "y", "_w", "u"}), function) for node, function in _with_functions(tree)]
    assert [f for f in found if f[0]] == [
        (["x"], None), (["y"], None), (["_w"], "f"), (["u"], "f"), (["__init__"], None),
    ]


def test_the_package_imports_in_no_circle():
    graph = import_graph()
    assert "writer" in graph["__init__"] and "_compat" in graph["reader"]  # the graph is read at all
    found = [describe_cycle(graph, cycle) for cycle in cycles(graph)]
    assert found == [], "import cycles in dcp_filesystem:\n" + "\n".join(found)


# --------------------------------------------------------------------------- the formats' bytes

CODECS = ("_torch_save", "_safetensors")
# The zip signatures of a torch.save archive: local file header, central directory, end records.
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")
# Names of the codecs' format knowledge (or of its copies elsewhere): magic bytes, edge sizes.
# (Asking a codec how many head bytes it needs, _safetensors.SNIFF_BYTES, is not testing them: the one place that
# decides an item's format, _load_items.stored_as, reads that many and hands them to the codecs' own tests.)
FORMAT_NAMES = ("ZIP_MAGIC", "_ARCHIVE_EDGE_BYTES")
# Keys of a safetensors header.
FORMAT_KEYS = ("data_offsets",)
_STRUCT_CALLS = ("unpack", "unpack_from", "iter_unpack", "pack", "pack_into", "Struct")


def _struct_format(node: ast.AST) -> Optional[str]:
    """The format string of a struct call (``struct.unpack("<Q", ...)``, ``Struct("<Q")``), if constant."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    fmt = node.args[0]
    if name in _STRUCT_CALLS and isinstance(fmt, ast.Constant) and isinstance(fmt.value, str):
        return fmt.value
    return None


def _is_slice(node: ast.AST) -> bool:
    return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice)


def format_checks(tree: ast.Module) -> List[Tuple[int, str]]:
    """(line, what) of each place ``tree`` tests a format's magic bytes or reads its layout."""
    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            signatures = [s for s in ZIP_SIGNATURES if s in node.value]
            if signatures:
                what = f"the zip signature {signatures[0]!r}"
        elif isinstance(node, ast.Constant) and node.value in FORMAT_KEYS:
            what = f"the safetensors header key {node.value!r}"
        elif isinstance(node, ast.Name) and node.id in FORMAT_NAMES:
            what = node.id
        elif isinstance(node, ast.Attribute) and node.attr in FORMAT_NAMES:
            what = ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and any(alias.name in FORMAT_NAMES for alias in node.names):
            what = "import of " + ", ".join(alias.name for alias in node.names if alias.name in FORMAT_NAMES)
        elif isinstance(node, ast.Call) and "Q" in (_struct_format(node) or ""):
            what = f"a 64-bit header length: {ast.unparse(node)}"
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            raw = [o for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, bytes)]
            if raw and any(_is_slice(o) for o in operands):
                what = f"a raw byte check: {ast.unparse(node)}"
        if what is not None:
            found.append((getattr(node, "lineno", 0), what))
    return sorted(set(found))


def test_the_format_check_finder_sees_each_kind_of_check():
    tree = ast.parse(
        "from ._torch_save import ZIP_MAGIC\n"
        "if head[:4] == b'PK\\x03\\x04' or head[8:9] == b'{': pass\n"
        "n = _safetensors.SNIFF_BYTES\n"
        "(size,) = struct.unpack('<Q', head[:8])\n"
        "begin, end = entry['data_offsets']\n"
        "magic, crc = _TRAILER.unpack_from(data)\n"
        "ok = payload[:4] != ZIP_MAGIC\n"
    )
    assert format_checks(tree) == [
        (1, "import of ZIP_MAGIC"),
        (2, "a raw byte check: head[8:9] == b'{'"),
        (2, "a raw byte check: head[:4] == b'PK\\x03\\x04'"),
        (2, "the zip signature b'PK\\x03\\x04'"),
        (4, "a 64-bit header length: struct.unpack('<Q', head[:8])"),
        (5, "the safetensors header key 'data_offsets'"),
        (7, "ZIP_MAGIC"),
    ]


def test_only_the_codecs_test_their_formats_bytes():
    trees = sources()
    assert all(codec in trees and format_checks(trees[codec]) for codec in CODECS)  # they do, and are found
    offenders = {
        f"{name}.py": [f"line {line}: {what}" for line, what in format_checks(tree)]
        for name, tree in trees.items()
        if name not in CODECS
    }
    offenders = {name: found for name, found in offenders.items() if found}
    assert offenders == {}, "modules other than the codecs that test a format's bytes or read its layout:\n" + (
        "\n".join(f"{name}: " + "; ".join(found) for name, found in sorted(offenders.items()))
    )
