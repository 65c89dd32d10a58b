"""The package's layering (docs/ARCHITECTURE.md): imports run only downwards, no module imports
itself back through a cycle, no module grows past ~400 lines, and the public names resolve.

Imports are read from the source (module level, inside functions, and the module paths of lazy
export tables), so a lazy upward import counts as much as an eager one.
"""
import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_tokweight"
# bottom to top; a module may import its own room and the rooms below it
LAYERS = {"errors": 0, "common": 0, "weighting": 1, "data": 2, "loss": 3, "model": 4, "longcontext": 5,
          "megatron": 6, "trainer": 7, "cli": 8}
MAX_LINES = 400


def modules():
    """{dotted name: path} of every Python module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path, known):
    """The package modules `path` imports (`from pkg import submodule` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]  # lazy export tables and the CLI's subcommand table
        for name in names:
            if name in known:
                found.add(name)
        # `from pkg import submodule` (a .py or a compiled extension): the submodule, not the package
        if isinstance(node, ast.ImportFrom) and node.module in known and known[node.module].name == "__init__.py":
            folder = known[node.module].parent
            if any(f"{node.module}.{a.name}" in known or any(folder.glob(f"{a.name}.*.so"))
                   or (folder / f"{a.name}.py").is_file() for a in node.names):
                found.discard(node.module)
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph():
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_rooms_are_known():
    rooms = {room(m) for m in modules()} - {""}
    assert rooms <= set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}"


def test_imports_run_only_downwards():
    upward = []
    for src, targets in graph().items():
        if src == "megatron_tokweight":  # the public facade: lazy names from every room
            continue
        for dst in targets:
            if room(dst) and LAYERS[room(dst)] > LAYERS[room(src)]:
                upward.append(f"{src} -> {dst}")
    assert upward == [], "imports that run back up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = {src: {d for d in dsts if d != "megatron_tokweight"} for src, dsts in graph().items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def uses_torch_distributed(path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and getattr(node.value, "id", "") == "torch":
            return True
    return False


def test_the_data_layer_needs_no_process_group():
    assert [name for name, path in modules().items() if room(name) == "data" and uses_torch_distributed(path)] == []


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("module, name", [
    ("megatron_tokweight", "pack_lengths"), ("megatron_tokweight", "PackResult"),
    ("megatron_tokweight", "sample_weights"), ("megatron_tokweight", "WeightingConfig"),
    ("megatron_tokweight", "weighted_cross_entropy"), ("megatron_tokweight.loss", "make_loss_func"),
    ("megatron_tokweight.megatron", "extra_args_provider"), ("megatron_tokweight.megatron", "get_batch"),
    ("megatron_tokweight.megatron", "build_packed_datasets"), ("megatron_tokweight.megatron", "forward_step"),
    ("megatron_tokweight.cli", "main"), ("megatron_tokweight.trainer", "TrainConfig"),
])
def test_public_names_resolve(module, name):
    assert getattr(importlib.import_module(module), name) is not None
