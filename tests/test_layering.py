"""The package is layered and loop-free, read from the source with ``ast`` (every ``import`` statement, those inside
functions included):

* every import between two parts of simnpo_fast goes to the same layer or a lower one (:data:`LAYERS`);
* ``kernels/`` (installed as ``simnpo_fast.kernels``) imports nothing of simnpo_fast outside itself;
* no cycle between the parts (any import), and no cycle between modules through their module-level imports.

A *part* is ``simnpo_fast.<name>`` (a module or a subpackage, e.g. ``train``); ``""`` is the package itself (its
``__init__``, the public facade). Importing a submodule also runs its package's ``__init__``: that implicit step is
not an edge here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Lowest first. A part may import its own layer and the layers below.
LAYERS = [
    ("foundation", {"errors", "synthetic_batch"}),
    ("Triton kernels", {"kernels"}),
    ("backends", {"packing", "backends", "objectives"}),
    ("losses", {"ops", "methods", "batch", "criterion", "modules"}),
    ("data and processes", {"data", "distributed"}),
    ("model glue", {"model", "hf", "likelihood", ""}),
    ("training", {"train"}),
    ("evaluation", {"eval"}),
    ("entry points", {"plan", "plan_table", "markov", "studies", "demo"}),
    ("command line", {"cli"}),  # every argparse parser and `main`; no library module imports it
]
LAYER_OF = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}


def modules() -> dict:
    """``{dotted module name: path}`` of the library (kernels/ as simnpo_fast.kernels)."""
    out = {}
    for folder, package in (("simnpo_fast", "simnpo_fast"), ("kernels", "simnpo_fast.kernels")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((package,) + rel)] = path
    return out


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _module_level(tree: ast.Module):
    """The statements that run on import (class bodies and if / try blocks included, function bodies not)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo.extend(getattr(node, field, None) or [])


def imports(module: str, path: Path, mods: dict, *, module_level_only: bool = False) -> set:
    """The simnpo_fast modules ``module`` imports (``from pkg import submodule`` -> the submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = _module_level(tree) if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "simnpo_fast")
        elif isinstance(node, ast.ImportFrom):
            target = _target(module, path.name == "__init__.py", node)
            if target.split(".")[0] != "simnpo_fast":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in mods else target)
    out.discard(module)
    return out


def part(module: str) -> str:
    names = module.split(".")
    return names[1] if len(names) > 1 else ""


def find_cycle(graph: dict):
    """One cycle of ``graph`` (``{node: set of nodes}``) as a list ``[a, b, ..., a]``, or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = "done"
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_reader_resolves_relative_lazy_and_submodule_imports():
    mods = modules()
    assert "simnpo_fast.kernels.seq_logprob" in mods and "simnpo_fast.train.checkpoint" in mods
    got = imports("simnpo_fast.eval.runner", mods["simnpo_fast.eval.runner"], mods)
    assert {"simnpo_fast.likelihood", "simnpo_fast.model", "simnpo_fast.data"} <= got
    lazy = imports("simnpo_fast.eval.hook", mods["simnpo_fast.eval.hook"], mods)
    assert "simnpo_fast.train.checkpoint" in lazy  # imported inside a function
    assert "simnpo_fast.train.checkpoint" not in imports("simnpo_fast.eval.hook", mods["simnpo_fast.eval.hook"],
                                                         mods, module_level_only=True)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_part_has_a_layer():
    missing = sorted({part(m) for m in modules()} - set(LAYER_OF))
    assert not missing, f"parts of simnpo_fast with no layer: {missing} (add them to LAYERS in {__file__})"


def test_no_upward_imports():
    mods = modules()
    bad = []
    for m, path in mods.items():
        for t in imports(m, path, mods):
            src, dst = part(m), part(t)
            if src in LAYER_OF and dst in LAYER_OF and LAYER_OF[dst] > LAYER_OF[src]:
                bad.append(f"{m} ({LAYERS[LAYER_OF[src]][0]}) imports {t} ({LAYERS[LAYER_OF[dst]][0]})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_kernels_import_nothing_of_simnpo_fast():
    mods = modules()
    bad = [f"{m} imports {t}" for m, path in mods.items() if part(m) == "kernels"
           for t in imports(m, path, mods) if part(t) != "kernels"]
    assert not bad, "kernels/ must stay Triton only:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    parts: dict = {}
    for m, path in mods.items():
        parts.setdefault(part(m), set()).update(part(t) for t in imports(m, path, mods) if part(t) != part(m))
    cycle = find_cycle(parts)
    assert cycle is None, "import cycle between parts of simnpo_fast: " + " -> ".join(p or "simnpo_fast" for p in cycle)
    graph = {m: imports(m, path, mods, module_level_only=True) & set(mods) for m, path in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)
