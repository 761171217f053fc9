"""The code base's shape: no import circles between mpoe_exp's modules (counting imports inside functions too, the
ones that only hide a circle), and no function of the training loop longer than one screen."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mpoe_exp"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The mpoe_exp modules `path` imports anywhere (module level or inside a function), except imports only a type
    checker runs (`if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}
    # a package's __init__ is run by importing any of its modules: an edge to a.b is also an edge to a
    return {name: {m for m in deps if m != name} for name, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle found by a depth-first search (each reported once, from its smallest module)."""
    found: set[tuple[str, ...]] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt not in path and nxt > path[0]:
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    return [list(c) for c in sorted(found)]


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_between_modules():
    graph = import_graph()
    # a package importing its own submodules (mpoe_exp.moe -> mpoe_exp.moe.layer) is how packages re-export; the
    # circle that matters is between modules, so edges into a package's __init__ from its own submodules are out
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    assert cycles(graph) == []


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 60:
                long[f"{module_name(path)}.{n.name}"] = n.end_lineno - n.lineno + 1
    assert long == {}


def test_every_task_class_implements_the_task_protocol():
    from mpoe_exp import build_model, compose_config, run_spec
    from mpoe_exp.config import demo_data_for
    from mpoe_exp.tasks.tasks import ENCODER_TASK_TYPES, TASK_TYPES, Task, build_task

    classes = {*TASK_TYPES.values(), *ENCODER_TASK_TYPES.values()}
    assert all(Task in cls.__mro__ for cls in classes)  # declared, so a type checker holds each to it
    built = set()
    for model, task in [
        ("tiny-t5", "rte"), ("tiny-t5", "glue_multitask"), ("tiny-gpt2", "wikitext2"), ("tiny-gpt2", "emnlp_news"),
        ("tiny-bert", "rte"),
    ]:  # fmt: skip
        cfg = compose_config([f"model={model}", f"task={task}", f"data_dir={demo_data_for(task)}"])
        instance = build_task(run_spec(cfg), build_model(run_spec(cfg))[1])
        assert isinstance(instance, Task)  # the attributes are there, not only declared
        built.add(type(instance))
    assert built == classes


def code_names(path: Path) -> set[str]:
    """The names, attributes, definitions, arguments, imported names and whole strings of `path`'s code
    (docstrings and comments left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            names.add(n.attr)
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(n.name)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.alias):
            names.add(n.name.rpartition(".")[2])
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            names.add(n.value)
    return names


def code_words(path: Path) -> set[str]:
    """The lower-case words of `code_names`: `central_parameters` gives central and parameters, `MPOExperts` gives
    mpo and experts."""
    import re

    return {w.lower() for name in code_names(path) for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)}


def test_code_words_splits_names():
    source = ROOT / "tests" / "test_structure.py"
    assert {"code", "words", "docstrings"} <= code_words(source)


def test_the_trainer_knows_no_method_and_no_expert_kind():
    """What training needs of an expert model, the model gives (its `training_hooks`, moe/hooks.py): training.py
    imports nothing from moe/ and its code names no method (conf/method/) and no kind of expert."""
    from mpoe_exp.moe import EXPERTS

    training = PACKAGE / "training.py"
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert {m for m in imported_modules(training, modules) if m.startswith("mpoe_exp.moe")} == set()
    methods = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    kinds = set(EXPERTS)
    assert {"mpoe", "switch", "dense"} <= methods and "mpo" in kinds
    assert code_words(training) & (methods | kinds) == set()


def test_a_method_s_relations_are_checked_by_the_constructors_that_need_them():
    """top_k <= num_experts, Cartesian's even expert count and the MPO factorization are refused by the router and
    layer that need them (built on the meta device before any work: models.refuse_unbuildable), not again by the
    config code."""
    import pytest

    from mpoe_exp.moe import NoisyTopKRouter
    from mpoe_exp.moe.adapters import TopKRouter

    relations = {"top_k", "num_experts", "factorization", "num_tensors"}
    assert relations & code_names(PACKAGE / "config.py") == set()
    assert "factorization" not in code_names(PACKAGE / "schema.py")
    for router in (NoisyTopKRouter, TopKRouter):
        with pytest.raises(ValueError, match=r"top_k=5 is not allowed: it must be in 1\.\.4"):
            router(8, 4, top_k=5)


def test_tasks_import_nothing_from_training():
    """Layering: a task formats data, computes its loss and scores predictions; the trainer calls it, never the
    reverse (the token loss the tasks share is tasks/losses.py)."""
    graph = import_graph()
    offending = {
        (name, dep)
        for name, deps in graph.items()
        if name.startswith("mpoe_exp.tasks")
        for dep in deps
        if dep == "mpoe_exp.training" or dep.startswith("mpoe_exp.training.")
    }
    assert offending == set()


MODEL_CODE = ("torch", "transformers", "mpoe_exp.models", "mpoe_exp.moe", "mpoe_exp.mpo", "mpoe_exp.training")


def test_make_tables_imports_no_model_code(tmp_path):
    """Layering: `make tables` reads results files; it runs (tables, comparisons, figures) without importing torch,
    transformers or any model code of the package. Run on the committed record of the converged MiniLM study, in a
    fresh interpreter, whose modules are listed at the end."""
    import json
    import shutil
    import subprocess
    import sys

    runs = tmp_path / "runs"
    shutil.copytree(ROOT / "docs" / "minilm_converged" / "runs", runs)
    script = f"""
import json, sys
from mpoe_exp import tables
tables.main([{str(runs)!r}, "--experiment", "minilm_converged"])
print(json.dumps(sorted(sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    written = list((runs / "minilm_converged" / "tables").iterdir())
    assert any(p.suffix == ".md" for p in written) and any(p.suffix == ".png" for p in written)  # tables, figures
    loaded = [m for m in modules if any(m == c or m.startswith(c + ".") for c in MODEL_CODE)]
    assert loaded == []


def test_the_glue_facts_are_written_once():
    """The GLUE task list, fields, labels, metrics and split rule live in mpoe_exp/glue_tasks.py; no other module
    spells the list of the eight tasks again."""
    import re

    listing = re.compile(r'"cola",\s*"sst2",\s*"mrpc"')
    spelled = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if listing.search(p.read_text())]
    assert spelled == []
    from mpoe_exp import metrics
    from mpoe_exp.glue_tasks import GLUE
    from mpoe_exp.tasks import glue_data

    assert glue_data.GLUE_TASKS == tuple(GLUE) == tuple(metrics.GLUE_MAIN_METRIC) == tuple(metrics.GLUE_TASK_METRICS)


def test_moe_imports_no_config_or_schema_code():
    """Layering: the expert layers say what settings they take (types in `LayerKind.keys`, router constructors'
    signatures); the config layer checks them. moe/ imports none of config, schema, rules or conf_files."""
    config_code = {"mpoe_exp.config", "mpoe_exp.conf_files", "mpoe_exp.schema", "mpoe_exp.rules"}
    graph = import_graph()
    offending = {(name, dep) for name, deps in graph.items() if name.startswith("mpoe_exp.moe") for dep in deps}
    assert {(name, dep) for name, dep in offending if dep in config_code} == set()


FAMILY_CLASSES = {
    *("T5LayerFF", "T5Config", "T5ForConditionalGeneration", "GPT2MLP", "GPT2Config", "GPT2LMHeadModel"),
    *("BertLayer", "BertConfig", "BertForSequenceClassification"),
}


def test_what_a_model_family_is_lives_in_its_backbone_file():
    """A family's transformers classes appear in its file under mpoe_exp/backbones/ and nowhere else in the
    package, and no module asks which family a model is (`family == "t5"`): it asks the family (`FAMILIES[name]`:
    its kind, shapes, FFN sites, tokenizer, head). backbones/ imports none of config, schema, models, tasks or
    training."""
    import re

    asks = re.compile(r"""family\s*(==|!=|in)\s*[("'\[]""")
    named, asked = set(), []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name != "backbones":
            named |= {f"{module_name(path)}: {name}" for name in code_names(path) & FAMILY_CLASSES}
            asked += [module_name(path)] if asks.search(path.read_text()) else []
    assert named == set() and asked == []
    above = ("mpoe_exp.config", "mpoe_exp.schema", "mpoe_exp.tasks", "mpoe_exp.training", "mpoe_exp.models")
    offending = {
        (name, dep)
        for name, deps in import_graph().items()
        if name.startswith("mpoe_exp.backbones")
        for dep in deps
        if dep.startswith(above)
    }
    assert offending == set()


def test_only_composition_the_runner_and_the_record_see_the_composed_config():
    """Every module below the runner receives its typed spec (mpoe_exp/spec.py), not Hydra's DictConfig: only the
    config composition (config.py, the CLI entry and the sweep callback Hydra calls), the runner and the run record
    name it."""
    allowed = {"config.py", "__main__.py", "sweep.py", "runner.py", "results.py"}
    naming = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "DictConfig" in p.read_text()}
    assert naming <= allowed, naming - allowed
