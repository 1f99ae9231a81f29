"""The structure the code builds on: wings in layers, one gate computation, one map of the units, no cycles."""
import ast
import copy
from pathlib import Path

import pytest
import torch

from abcgpt.gates.gate import Gates, gates_for, tent_gate
from abcgpt.gates.units import permutations, sort_units, unit_map
from abcgpt.model.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"abcgpt": "abcgpt", "abcgpt_kernels": "kernels"}  # import name: folder
WINGS = ("core", "gates", "backends", "model", "data", "measuring", "training", "serving", "tools")
"""abcgpt's wings, lowest first: a module imports from its own wing and the wings before it, never after."""


def module_files():
    """Every module of our packages, by its dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = (package, *path.relative_to(ROOT / folder).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path, name, known):
    """The modules of our packages that the module called name (at path) imports; from P import m counts as
    the module P.m where there is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] in PACKAGES:
                target = node.module
            else:
                continue
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found


def import_graph():
    files = module_files()
    return {name: imports_of(path, name, files) for name, path in files.items()}


def wing_of(module):
    """The wing an abcgpt module belongs to; None for the package itself, kernels and anything else."""
    parts = module.split(".")
    return parts[1] if parts[0] == "abcgpt" and len(parts) > 1 else None


def climbs(graph):
    """Every arrow that breaks the layering: a module outside a wing, one whose import points to a later wing
    (or to the package's top, which imports the wings), and the kernels reaching into abcgpt."""
    broken = []
    for module, imported in graph.items():
        wing = wing_of(module)
        if module.startswith("abcgpt.") and wing not in WINGS:
            broken.append(f"{module} is in no wing")
            continue
        for target in sorted(imported):
            if module.startswith("abcgpt_kernels") and target.split(".")[0] == "abcgpt":
                broken.append(f"{module} -> {target}: the kernels know nothing of the library")
            elif wing in WINGS and target.split(".")[0] == "abcgpt":
                if wing_of(target) not in WINGS or WINGS.index(wing_of(target)) > WINGS.index(wing):
                    broken.append(f"{module} -> {target}")
    return broken


def test_no_import_cycles():
    graph = import_graph()

    def visit(node, stack):
        assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node])

    for module in graph:
        visit(module, [])


def test_no_arrow_runs_back_up():
    """The wings are layers: a module imports its own wing and the wings below it, never one above."""
    assert climbs(import_graph()) == []


def test_the_layering_check_trips_on_a_climb():
    graph = {"abcgpt.core.errors": {"abcgpt.tools.cli"}, "abcgpt.gates.gate": {"abcgpt"},
             "abcgpt.loose": set(), "abcgpt_kernels.ops": {"abcgpt.gates.gate"},
             "abcgpt.tools.cli": {"abcgpt.core.errors"}}
    assert climbs(graph) == ["abcgpt.core.errors -> abcgpt.tools.cli", "abcgpt.gates.gate -> abcgpt",
                             "abcgpt.loose is in no wing", "abcgpt_kernels.ops -> abcgpt.gates.gate: the kernels know "
                             "nothing of the library"]


def test_each_wing_states_its_one_concern():
    """The wings in the tree are the layering's, each a package whose docstring is one line, and the design's
    module map gives them in the same order."""
    wings = {p.parent.name: p for p in (ROOT / "abcgpt").glob("*/__init__.py")}
    assert set(wings) == set(WINGS)
    for wing, path in wings.items():
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        assert doc and "\n" not in doc and len(tree.body) == 1, f"abcgpt.{wing}: one line saying its concern"
    assert "Wings, lowest first: " + " < ".join(f"`{w}`" for w in WINGS) in (ROOT / "docs" / "design.md").read_text()


TESTED_IN = {  # the modules without a test file of their own name, and the file that tests them
    "abcgpt.backends.executors": "test_backends.py", "abcgpt.backends.fused": "test_backends.py",
    "abcgpt.backends.registry": "test_backends.py", "abcgpt.core.atomic": "test_classes.py",
    "abcgpt.core.checkpoint": "test_reliability.py", "abcgpt.core.device": "test_bad_input.py",
    "abcgpt.core.limits": "test_settings.py", "abcgpt.core.preflight": "test_classes.py",
    "abcgpt.data.corpus": "test_data.py", "abcgpt.measuring.loss": "test_evaluate.py",
    "abcgpt.measuring.ngram": "test_dial.py", "abcgpt.model.gpt": "test_model.py",
    "abcgpt.serving.access": "test_serve.py", "abcgpt.serving.api_input": "test_settings.py",
    "abcgpt.serving.connections": "test_serve.py", "abcgpt.serving.server": "test_serve.py",
    "abcgpt.tools.calibrate": "test_dial.py", "abcgpt.tools.inspect": "test_run.py",
    "abcgpt.tools.permute": "test_units.py", "abcgpt.tools.sample": "test_cli.py", "abcgpt.tools.train": "test_cli.py",
    "abcgpt.training.config": "test_training.py", "abcgpt.training.process": "test_distributed.py",
    "abcgpt.training.runlog": "test_training.py", "abcgpt.training.saving": "test_training.py",
    "abcgpt.training.trainer": "test_training.py", "abcgpt_kernels.gated_mlp": "test_kernels.py",
    "abcgpt_kernels.ops": "test_kernels.py",
}


def test_every_module_has_its_tests():
    """Each module has a test file of its name, or TESTED_IN names the file that tests it, which must load it:
    through its imports, or a tool it runs that does; TESTED_IN names no module that has its own file."""
    graph = import_graph()
    tests = ROOT / "tests"

    def reached(start):
        seen, todo = set(), list(start)
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
        return seen

    modules = {m: p for m, p in module_files().items() if p.name != "__init__.py"}
    own = {m for m, p in modules.items() if (tests / f"test_{p.stem}.py").exists()}
    assert set(TESTED_IN) == set(modules) - own
    for module, name in TESTED_IN.items():
        test = tests / name
        text = test.read_text()
        runs = {f"abcgpt.tools.{door.stem}" for door in ROOT.glob("*.py") if f'"{door.name}"' in text}  # python NAME.py
        runs |= {m for m in modules if f'"{m}"' in text}  # python -m the module
        loaded = reached(imports_of(test, f"tests.{test.stem}", modules) | runs)
        assert module in loaded, f"{name} does not test {module}"


def test_the_model_knows_backends_only_through_the_registry():
    imported = import_graph()["abcgpt.model.gpt"]
    assert "abcgpt.backends.registry" in imported
    assert not imported & {"abcgpt.backends.folded", "abcgpt.backends.fused", "abcgpt.backends.executors",
                            "abcgpt_kernels.ops"}


def test_the_kernels_load_gates_instead_of_computing_them():
    source = (ROOT / "kernels" / "gated_mlp.py").read_text() + (ROOT / "kernels" / "ops.py").read_text()
    assert "narrowness" not in source and "sin(" not in source


def test_no_script_edits_sys_path():
    for path in [*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py"), *module_files().values()]:
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
    tree = {str(p.relative_to(ROOT)) for folder in ("abcgpt", "kernels", "bench") for p in (ROOT / folder).rglob("*.py")
            if p.name != "__init__.py"}
    tree |= {p.name for p in ROOT.glob("*.py")} | {"abcgpt/serving/page.html"}
    assert named == tree, f"missing from the map: {sorted(tree - named)}; not in the tree: {sorted(named - tree)}"


def front_doors():
    """The command-line tools, each a module of abcgpt.tools (cli is what they share)."""
    return [p for p in sorted((ROOT / "abcgpt" / "tools").glob("*.py")) if p.stem not in ("__init__", "cli")]


def test_the_install_holds_every_package():
    """pyproject.toml lists every package of the tree under its import name (the kernels' is abcgpt_kernels), so
    that an installed abcgpt has all of it."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in module_files().items() if path.name == "__init__.py"} | {"bench"}
    assert set(setup["packages"]) == packages and setup["package-dir"] == {"abcgpt_kernels": "kernels"}


def test_every_tool_has_its_doors():
    """Each tool is a console script, abcgpt-NAME, and the top-level scripts are doors onto a tool of the same
    name that hold nothing else, so no tool lives outside the library."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"abcgpt-{p.stem}": f"abcgpt.tools.{p.stem}:command" for p in front_doors()}
    for door in ROOT.glob("*.py"):
        tree = ast.parse(door.read_text())
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [(n.module, [a.name for a in n.names]) for n in imports] == [
            (f"abcgpt.tools.{door.stem}", ["command", "main"])], f"{door.name} is not a door onto abcgpt.tools"
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], door.name


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
    for path in sorted(module_files().values()) + sorted((ROOT / "bench").glob("*.py")):  # the tools among them
        if path.name == "config.py":
            continue
        literals = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not literals & {"out", "out/ckpt.pt"}, f"{path.name} names the default run folder itself"
