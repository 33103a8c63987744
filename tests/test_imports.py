"""The package's import graph: no import circle, no module importing another's private name.

Every ``import`` and ``from ... import`` counts, at any depth (an import inside a function
still ties the two modules together), and so does ``module._name`` on a module imported from
the package. A private module (``mtcoll.execute._engine``) may be imported: it is a room of the
package; a private *name* in another module (``_engine._why_not``) may not. Serial, no MPI.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(package_dir):
    """``{dotted name: (path, is_package)}`` of every module under ``package_dir``."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _target(name, is_package, node):
    if not node.level:
        return node.module
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _private(attr):
    return attr.startswith("_") and not attr.startswith("__")


def graph(package_dir):
    """``(edges, private)``: per module the package modules it imports, and every
    ``(module, line, what)`` that takes another module's private name."""
    mods = modules(package_dir)
    root = package_dir.name
    edges = {name: set() for name in mods}
    private = []
    for name, (path, is_package) in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        bound = {}  # local name -> the package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        edges[name].add(a.name)
                        bound[a.asname or a.name] = a.name if a.asname else root
            elif isinstance(node, ast.ImportFrom):
                target = _target(name, is_package, node)
                if not target or target.split(".")[0] != root:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:
                        edges[name].add(sub)
                        bound[a.asname or a.name] = sub
                    else:
                        edges[name].add(target)
                        if _private(a.name):
                            private.append((name, node.lineno, f"{target}.{a.name}"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in bound and _private(node.attr):
                owner = bound[node.value.id]
                if f"{owner}.{node.attr}" not in mods:
                    private.append((name, node.lineno, f"{owner}.{node.attr}"))
        edges[name].discard(name)
    return edges, private


def circles(edges):
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    edges, _ = graph(ROOT / "mtcoll")
    assert len(edges) > 50  # the whole package was read
    assert circles(edges) == []


def test_no_module_imports_another_modules_private_name():
    _, private = graph(ROOT / "mtcoll")
    assert private == []


def test_the_checks_find_a_circle_and_a_private_name(tmp_path):
    """The two checks above on a package made to fail both: a circle through an import inside
    a function, and private names taken by ``from`` and by attribute."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import _hidden\nfrom .. import b\nb._secret\n",
        "sub/d.py": "from . import c\n",  # imports into the circle, not part of it
    }
    for rel, text in files.items():
        (pkg / rel).write_text(textwrap.dedent(text))
    edges, private = graph(pkg)
    assert circles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert sorted(p[2] for p in private) == ["pkg.a._hidden", "pkg.b._secret"]
