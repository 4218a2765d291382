"""The package's shape: graftlm's modules import one another without a circle (imports inside functions included),
and no library module drives the command line (graftlm.cli is the top: it imports the library, never the reverse)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# graftlm's packages and the folders they are installed from (pyproject.toml's package-dir)
PACKAGES = {"graftlm": ROOT / "graftlm", "graftlm.configuration": ROOT / "configuration",
            "graftlm.modeling": ROOT / "modeling", "graftlm.conversion": ROOT / "conversion"}


def modules():
    """{module name: file} of every graftlm module."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found.setdefault(name, path)
    return found


def imports(known):
    """{module: the graftlm modules it imports anywhere in its source}; the top package, which every submodule
    imports implicitly, is left out."""
    graph = {}
    for name, path in known.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
        resolved = set()
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            resolved.add(target)
        graph[name] = resolved - {"", "graftlm", name}
    return graph


def circles(graph):
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_circle_and_nothing_imports_the_cli():
    known = modules()
    assert {"graftlm.cli", "graftlm.convert", "graftlm.demo", "graftlm.offline", "graftlm.modeling.modeling_dfa"} <= set(known)
    graph = imports(known)
    assert "graftlm.registry" in graph["graftlm.cli"] and "graftlm.convert" in graph["graftlm.demo"]  # the parser sees them
    assert circles(graph) == [], [" -> ".join(circle) for circle in circles(graph)]
    assert [name for name, targets in graph.items() if "graftlm.cli" in targets] == []
