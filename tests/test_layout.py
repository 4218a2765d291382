"""The package's shape: graftlm's modules import one another without a circle (imports inside functions included),
no library module drives the command line (graftlm.cli is the top: it imports the library, never the reverse), and
only graftlm/registry.py and an architecture's own slot files name architectures (README, "Adding an architecture")."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# graftlm's packages and the folders they are installed from (pyproject.toml's package-dir)
PACKAGES = {"graftlm": ROOT / "graftlm", "graftlm.configuration": ROOT / "configuration",
            "graftlm.modeling": ROOT / "modeling", "graftlm.conversion": ROOT / "conversion"}


def modules(root=ROOT):
    """{module name: file} of every graftlm module (of the source tree at `root`)."""
    found = {}
    for package, folder in PACKAGES.items():
        folder = root / folder.relative_to(ROOT)
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


# ----- a fifth architecture touches only its own slot files, one registry row and one card template -----


def architecture_names():
    from graftlm import registry

    return set(registry.names())


def named_architectures(path, archs):
    """{architecture: first line} of the architectures a library file names: as a string constant equal to its name
    ("dfa"), or by importing one of its slot modules (a module whose name has the architecture as a `_`-separated
    part: modeling_dfa, conversion.dfa, train_dfa, bsbr_cache), directly or as a "graftlm...." module-path string."""

    def module_archs(module):
        return archs & set(module.rpartition(".")[2].split("_"))

    found = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        named = set()
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = {node.value} & archs if not node.value.startswith("graftlm.") else module_archs(node.value)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            named = {arch for module in modules for arch in module_archs(module)}
        for arch in named:
            found[arch] = min(found.get(arch, node.lineno), node.lineno)
    return found


def architecture_tables(root=ROOT):
    """'file:line: names dfa, bsbr' for every library file outside graftlm/registry.py that names architectures other
    than its own: a slot file (one whose name has an architecture as a `_`-separated part) may name only its own; any
    other file at most one (a feature of that architecture: DFA's pruning bench, the scaffold's chat). Two or more
    make a table or an if/elif chain that a fifth architecture would have to extend."""
    archs = architecture_names()
    problems = []
    for name, path in sorted(modules(root).items()):
        if name == "graftlm.registry":
            continue
        own = archs & set(path.stem.split("_"))
        found = named_architectures(path, archs)
        others = {arch: line for arch, line in found.items() if arch not in own}
        if len(others) > (0 if own else 1):
            listed = ", ".join(f"{arch} (line {line})" for arch, line in sorted(others.items(), key=lambda x: x[1]))
            problems.append(f"{path.relative_to(root)} names {listed}")
    return problems


def test_architectures_are_named_only_in_the_registry_and_their_own_slot_files():
    assert architecture_tables() == []


def test_the_architecture_check_finds_tables_and_foreign_imports(tmp_path):
    files = {
        "graftlm/registry.py": 'ROWS = {"dfa": 1, "bsbr": 2}',  # the table's place
        "graftlm/table.py": 'TARGETS = {"dfa": 0.8, "bsbr": 0.8}',
        "graftlm/chain.py": 'def f(arch):\n    if arch == "dfa":\n        return 1\n    import graftlm.train_bsbr',
        "graftlm/feature.py": 'from .modeling.modeling_dfa import DFAModel\nNAME = "dfa"',  # one architecture's feature
        "modeling/modeling_dfa.py": "from .bsbr_cache import Cache",
        "modeling/bsbr_cache.py": "from .modeling_bsbr import BSBRModel",  # the same architecture's slot
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert set(architecture_tables(tmp_path)) == {
        "graftlm/chain.py names dfa (line 2), bsbr (line 4)",
        "graftlm/table.py names dfa (line 1), bsbr (line 1)",
        "modeling/modeling_dfa.py names bsbr (line 1)",
    }


def test_every_declared_new_module_is_described_on_its_card():
    """The new modules a model class declares (float32 lists, _new_modules_in_model_dtype) each appear in its
    converter's NEW_MODULES, the card's list of new modules and their initialisation."""
    import importlib

    from graftlm import registry

    for arch in registry.all_architectures():
        model_class = arch.generation_class
        declared = {*model_class._keep_in_fp32_modules_strict, *model_class._new_modules_in_model_dtype}
        described = " ".join(importlib.import_module(arch.converter).NEW_MODULES)
        assert declared and all(name in described for name in declared), (arch.name, declared, described)
