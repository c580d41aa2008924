"""The package's shape: layered imports without cycles, tasks as a package, one training step, one
writer of summary.json, the logger closed on every exit path, the objective returned to Hydra."""
import ast
import math
from pathlib import Path

import pytest

import cvtrain
from cvtrain import TrainingDiverged

SRC = Path(cvtrain.__file__).parent
TASKS_DIR = SRC / "tasks"
CONFIG_TASKS = Path(__file__).parents[1] / "configs" / "task"
# imported inside functions on purpose: matplotlib is heavy and only needed to draw (viz.py imports it)
# optuna: the extra [search], imported when task=search runs (without it the task says how to install it)
LAZY_OK = ("matplotlib", "cvtrain.viz", "optuna")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(path: Path):
    """(module imported, at top level?) for every import in the file, `from a import b` resolved to a.b
    when a.b is one of cvtrain's modules."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in MODULES else node.module, id(node) in top))
    return found


def graph() -> dict:
    return {name: {m for m, _ in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_every_import_is_at_the_top_of_its_file():
    late = [(name, m) for name, path in MODULES.items() for m, at_top in imports(path)
            if not at_top and not m.startswith(LAZY_OK)]
    assert late == []


def test_no_module_imports_a_module_that_imports_it_back():
    edges = graph()

    def reaches(start, target, seen):
        for nxt in edges[start]:
            if nxt == target or (nxt not in seen and not seen.add(nxt) and reaches(nxt, target, seen)):
                return True
        return False

    cycles = sorted(name for name in edges if reaches(name, name, set()))
    assert cycles == []


def test_building_blocks_never_import_a_task():
    edges = graph()
    blocks = [name for name in MODULES if not name.startswith("cvtrain.tasks") and name != "cvtrain.__main__"]
    assert blocks and [(b, m) for b in blocks for m in edges[b] if m.startswith("cvtrain.tasks")] == []


def test_every_task_config_has_a_task_module_with_run():
    from cvtrain.__main__ import TASKS

    options = {p.stem for p in CONFIG_TASKS.glob("*.yaml")}
    assert options == set(TASKS) == {"train", "summary", "sanity", "gradcheck", "lr_find", "augviz", "ensemble",
                                        "evaluate", "predict", "export", "search"}
    for name, run in TASKS.items():
        assert run.__name__ == "run" and run.__module__ == f"cvtrain.tasks.{name}"
    assert (TASKS_DIR / "knn.py").is_file()  # fitted models: the train task hands them over


def calls(attribute: str) -> set:
    """The modules whose code calls `<something>.<attribute>(...)`."""
    return {name for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute}


def test_one_training_step_and_one_summary_writer():
    # backward() and the optimizer step are written in one place; the loop, lr_find and the sanity check use it
    assert calls("backward") == {"cvtrain.loop"}
    assert calls("zero_grad") == {"cvtrain.loop"}
    step_callers = {name for name, path in MODULES.items() if "training_step(" in path.read_text()}
    assert {"cvtrain.tasks.train", "cvtrain.tasks.lr_find", "cvtrain.tasks.sanity"} <= step_callers
    writers = {name for name, path in MODULES.items() for line in path.read_text().splitlines()
               if '"summary.json"' in line and ("write" in line or "open(" in line)}
    assert writers == {"cvtrain.monitor"}


def test_no_code_compares_a_model_name_with_knn():
    offenders = [name for name, path in MODULES.items() if "== \"knn\"" in path.read_text()
                 or "!= \"knn\"" in path.read_text()]
    assert offenders == []


TINY = ["data=synthetic", "data.num_samples=120", "data.image_size=8", "model=linear", "trainer.epochs=2",
        "trainer.progress=false", "trainer.viz=false"]


def test_the_train_task_returns_the_best_val_accuracy(compose_config, tmp_path):
    import json

    from cvtrain.__main__ import TASKS

    objective = TASKS["train"](compose_config(TINY), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert isinstance(objective, float) and objective == summary["best_val_acc"]
    knn = TASKS["train"](compose_config([*TINY, "model=knn"]), tmp_path / "knn")
    assert knn == json.loads((tmp_path / "knn" / "summary.json").read_text())["best_val_acc"]


def test_a_diverged_trial_returns_a_failure_value_that_is_not_nan():
    from cvtrain.__main__ import DIVERGED

    assert isinstance(DIVERGED, float) and not math.isnan(DIVERGED) and DIVERGED <= 0.0


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), TrainingDiverged("nan")])
def test_the_logger_is_closed_on_every_exit_path(compose_config, tmp_path, monkeypatch, error):
    from cvtrain.monitor import RunLogger
    from cvtrain.tasks import train

    loggers = []
    monkeypatch.setattr(RunLogger, "__init__", _recording(RunLogger.__init__, loggers))

    def failing_evaluate(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "evaluate", failing_evaluate)
    with pytest.raises(type(error)):
        train.train(compose_config(TINY), tmp_path)
    (logger,) = loggers
    assert logger.metrics_file.closed and logger.writer.file_writer is None  # SummaryWriter.close() clears it


def _recording(init, into):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        into.append(self)
    return wrapped


def test_run_dir_names_say_the_task_and_skip_an_unused_optimizer():
    from cvtrain.__main__ import run_name

    assert run_name("train", "digits", "lenet", "lenet", "adam", "none") == "digits_lenet_adam"
    assert run_name("train", "digits", "knn", "knn", "adam", "none") == "digits_knn"
    assert run_name("summary", "digits", "lenet", "lenet", "adam", "none") == "summary_digits_lenet"
    assert run_name("lr_find", "digits", "svm", "linear", "sgd", "none") == "lr_find_digits_svm_sgd"
    assert run_name("augviz", "cifar10", "lenet", "lenet", "adam", "strong") == "augviz_cifar10_strong"
    assert run_name("evaluate", "digits", "lenet", "lenet", "adam", "none") == "evaluate"  # the checkpoint's, not these
    assert run_name("train", "digits", "lenet", "lenet", "sgd", "none", "sweep") == "lenet_sgd"  # <sweep>/<n>_lenet_sgd
