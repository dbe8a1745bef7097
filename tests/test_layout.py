"""The package's layers: every import points down (models <- text, diffusion <- weights <- adapters <-
sampling, training <- evaluation <- experiments), nothing imports in a cycle, and configs load
without jax."""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A module may import its own package and any package of a lower rank. The root modules (runs,
# images, parallel, cli, the package's __init__) and data/ import nothing above them.
RANKS = {"": 0, "runs": 0, "images": 0, "parallel": 0, "cli": 0, "data": 0, "assets": 0,
         "preprocessors": 0,
         "models": 1, "text": 2, "diffusion": 2, "weights": 3, "adapters": 4, "sampling": 5,
         "training": 5, "evaluation": 6, "experiments": 7}
# Imports allowed against the ranks, each with its reason.
EXCEPTIONS = {
    # Preview grids during training draw with the sampler (imported inside the function that draws).
    ("sdjax.training.loop", "sdjax.sampling.generator"),
    ("sdjax.training.loop", "sdjax.sampling.requests"),
    ("sdjax.training.loop", "sdjax.sampling.spec"),
}
# diffusion/ is the maths of schedules and samplers alone; the generic training code does not know
# the toy shapes world the embedded model is trained on.
FORBIDDEN = {"diffusion": ("",), "training": ("data",)}


def _modules() -> dict:
    """{dotted module name: path} for sdjax/ and experiments/."""
    found = {}
    for path in glob.glob(os.path.join(ROOT, "sdjax", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "experiments", "*.py")):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: str, module_level_only: bool = False) -> set:
    """The sdjax modules `name` imports (submodules resolved: `from sdjax.x import y` names
    sdjax.x.y where that is a module)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sdjax"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "sdjax":
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "experiments":
        return "experiments"
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else ""


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted(m for m in MODULES if m.startswith("sdjax.") and m.split(".")[1] not in RANKS)
    assert not unknown, f"add these to RANKS in tests/test_layout.py (or move them): {unknown}"


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in MODULES.items():
        layer = _layer(name)
        for imported in _imports(name, path):
            target = _layer(imported)
            if (name, imported) in EXCEPTIONS:
                continue
            upward = RANKS[target] > RANKS[layer]
            sideways = RANKS[target] == RANKS[layer] and target != layer and RANKS[layer] > 0
            if upward or sideways or target in FORBIDDEN.get(layer, ()):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sdjax.sampling.generator import Generator\n")
    assert _imports("sdjax.models.bad", str(bad)) == {"sdjax.sampling.generator"}
    assert RANKS[_layer("sdjax.sampling.generator")] > RANKS[_layer("sdjax.models.bad")]


def test_no_import_cycles_at_module_level():
    graph = {n: {i for i in _imports(n, p, module_level_only=True) if i in MODULES}
             for n, p in MODULES.items()}
    # A package's __init__ is imported by its submodules implicitly; only explicit edges count.
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_configs_load_without_jax():
    code = (
        "import glob, importlib, json, os, sys\n"
        "for path in sorted(glob.glob('configs/*.py')):\n"
        "    module = importlib.import_module('configs.' + os.path.basename(path)[:-3])\n"
        "    if hasattr(module, 'get_config'):\n"
        "        module.get_config()\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'jax', 'jaxlib', 'flax', 'optax', 'orbax', 'torch', 'transformers'})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("entry", sorted(os.path.basename(p)[:-3]
                                         for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                                         if not p.endswith("__init__.py")))
def test_experiments_do_not_import_each_other(entry):
    tree = ast.parse(open(MODULES[f"experiments.{entry}"]).read())
    others = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in others if m.split(".")[0] == "experiments"}, others
