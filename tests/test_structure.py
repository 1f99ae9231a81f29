"""The structure the fast paths build on: one gate computation, one map of the units, no import cycles."""
import ast
import copy
from pathlib import Path

import pytest
import torch

from abcgpt.gate import Gates, gates_for, tent_gate
from abcgpt.model import GPT, GPTConfig
from abcgpt.units import permutations, sort_units, unit_map

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("abcgpt", "kernels")


def imports_of(path, package):
    """The modules of our packages that a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level and node.module:
                found.add(f"{package}.{node.module}")
            elif node.level:  # from . import name: the module package.name
                found |= {f"{package}.{a.name}" for a in node.names}
            elif node.module and node.module.split(".")[0] in PACKAGES:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found


def test_no_import_cycles():
    graph = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            graph[name] = imports_of(path, package)

    def visit(node, stack):
        assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node])

    for module in graph:
        visit(module, [])


def test_the_model_knows_backends_only_through_the_registry():
    imported = imports_of(ROOT / "abcgpt" / "model.py", "abcgpt")
    assert "abcgpt.backends" in imported
    assert not imported & {"abcgpt.folded", "abcgpt.fused", "abcgpt.executors", "kernels.ops"}


def test_the_kernels_load_gates_instead_of_computing_them():
    source = (ROOT / "kernels" / "gated_mlp.py").read_text() + (ROOT / "kernels" / "ops.py").read_text()
    assert "narrowness" not in source and "sin(" not in source


def test_no_script_edits_sys_path():
    for path in [*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "abcgpt").glob("*.py")]:
        assert "sys.path" not in path.read_text(), path


@pytest.mark.parametrize("alpha", [0.3, torch.tensor([0.0, 0.7, 1.0])])
def test_gates_for_holds_every_group_of_the_forward(alpha):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    gates = gates_for(alpha, model.scores(), narrowness=0.7)
    assert isinstance(gates, Gates) and len(gates.heads) == len(gates.hidden) == 3
    for got, scores in zip(gates.groups(), model.scores().groups()):
        torch.testing.assert_close(got, tent_gate(alpha, scores, 0.7), rtol=0, atol=0)
    assert gates.per_row == isinstance(alpha, torch.Tensor)


def test_unit_map_covers_every_tensor_of_a_gated_model():
    for bias in (False, True):
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11, bias=bias))
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
        units = unit_map(model.config)
        assert names <= set(units)
        assert bias or not names >= {n for n in units if n.endswith(".bias")}


def test_permuting_refuses_a_tensor_the_map_does_not_know():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11))
    model.register_buffer("mystery", torch.zeros(8))
    with pytest.raises(ValueError, match="no unit map for mystery"):
        sort_units(model)
    tensors = {"transformer.h.0.mlp.extra.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="refusing to permute"):
        permutations(model.config, tensors, None)


def test_sorting_a_sorted_model_changes_nothing():
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=16, block_size=8, vocab_size=11, bias=True))
    before = copy.deepcopy(model.state_dict())
    sort_units(model)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_the_module_map_matches_the_tree():
    """docs/design.md's module map names every module of the library, the kernels and the benchmarks, and every
    entry point, and names nothing that is not there: it cannot go stale."""
    import re

    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("## Module map"):text.index("## 1. The math")]
    named = {path for row in table.splitlines() if row.startswith("| `") for path in
             re.findall(r"`([^`]+\.(?:py|html))`", row.split(" | ")[0])}
    tree = {str(p.relative_to(ROOT)) for folder in ("abcgpt", "kernels", "bench") for p in (ROOT / folder).glob("*.py")
            if p.name != "__init__.py"}
    tree |= {p.name for p in ROOT.glob("*.py")} | {"abcgpt/page.html"}
    assert named == tree, f"missing from the map: {sorted(tree - named)}; not in the tree: {sorted(named - tree)}"


def front_doors():
    """The command-line tools: the top-level scripts and the library's own (python -m abcgpt.NAME)."""
    return sorted(ROOT.glob("*.py")) + [ROOT / "abcgpt" / "inspect.py", ROOT / "abcgpt" / "permute.py"]


def test_one_place_catches_a_user_error():
    """cli.user_errors turns a UserError into the tool's one line; no tool catches one itself, and every tool's
    main goes through it."""
    for path in front_doors():
        tree = ast.parse(path.read_text())
        caught = [h for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and isinstance(h.type, ast.Name)
                  and h.type.id == "UserError"]
        assert not caught, f"{path.name} catches UserError itself: leave it to cli.user_errors"
        mains = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main"]
        assert mains and all(any(getattr(d, "id", None) == "user_errors" for d in f.decorator_list) for f in mains), (
            f"{path.name}'s main is not wrapped in cli.user_errors")


def test_the_default_run_folder_is_named_once():
    """'out' is config.DEFAULT_OUT_DIR and its checkpoint run.DEFAULT_CHECKPOINT: no tool spells either."""
    for path in front_doors() + sorted((ROOT / "abcgpt").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        if path.name == "config.py":
            continue
        literals = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not literals & {"out", "out/ckpt.pt"}, f"{path.name} names the default run folder itself"
