"""task=sanity and task=gradcheck: they pass on correct models and catch planted bugs."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cvtrain import ChecksFailed
from cvtrain.losses import Regularizer, build_loss
from cvtrain.tasks import gradcheck as gradcheck_task
from cvtrain.tasks.gradcheck import gradcheck, gradcheck_verdict, relative_error
from cvtrain.tasks.sanity import (FAIL, PASS, SKIP, Check, check_initial_loss, check_overfit, check_regularization,
                                  expected_initial_loss, sanity_checks, tiny_subset, verdict)

SYNTHETIC = ["data=synthetic", "data.image_size=32", "data.channels=3", "trainer.device=cpu"]


def blobs(n=40, d=12, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.arange(n) % classes


class IgnoresInput(nn.Module):
    """A planted bug: the scores are a learned constant, whatever the image."""

    def __init__(self, d, classes):
        super().__init__()
        self.fc = nn.Linear(d, classes)

    def forward(self, x):
        return self.fc(torch.zeros_like(x))


class WrongReLU(torch.autograd.Function):
    """A planted bug: ReLU whose backward forgets the mask (passes the gradient everywhere)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        return grad


class TwoLayer(nn.Module):
    def __init__(self, d=12, hidden=16, classes=4, relu=F.relu):
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Linear(d, hidden), nn.Linear(hidden, classes), relu

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


# --- check 1: the initial loss ----------------------------------------------------------------

@pytest.mark.parametrize("loss, expected", [("cross_entropy", math.log(10)), ("hinge", 9.0),
                                            ("squared_hinge", 9.0), ("mse", 1.0)])
def test_expected_initial_loss_is_the_real_loss_at_zero_scores(compose_config, loss, expected):
    loss_cfg = compose_config([f"loss={loss}"]).loss
    value, text = expected_initial_loss(loss_cfg, 10)
    assert value == pytest.approx(expected)
    y = torch.arange(10).repeat(3)
    assert build_loss(loss_cfg)(torch.zeros(30, 10), y).item() == pytest.approx(value, rel=1e-6)


def test_initial_loss_passes_for_a_correct_model_and_fails_for_a_loss_scaled_by_10():
    torch.manual_seed(0)
    x, y = blobs(classes=4)
    model = TwoLayer()
    with torch.no_grad():
        model.fc2.weight.mul_(0.01)  # a small output layer, as every cvtrain init gives
    expected = (math.log(4), "ln(4)")
    good = check_initial_loss(model, nn.CrossEntropyLoss(), x, y, expected)
    assert good.status == PASS, good.line
    bad = check_initial_loss(model, lambda s, t: 10 * F.cross_entropy(s, t), x, y, expected)
    assert bad.status == FAIL and "ln(4)" in bad.line
    assert check_initial_loss(model, nn.CrossEntropyLoss(), x, y, None).status == SKIP
    # the check leaves the model as it found it
    before = [p.clone() for p in model.parameters()]
    check_initial_loss(model, nn.CrossEntropyLoss(), x, y, expected)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_initial_loss_is_judged_at_the_real_init_so_large_initial_scores_fail():
    torch.manual_seed(0)
    x, y = blobs(classes=4)
    model = TwoLayer()
    with torch.no_grad():
        model.fc2.weight.mul_(30)  # scores of std ~10: the loss is far above ln(4), and the check says so
    check = check_initial_loss(model, nn.CrossEntropyLoss(), x, y, (math.log(4), "ln(4)"))
    assert check.status == FAIL and "scale down the final layer" in check.detail, check.line


# --- check 2: regularization --------------------------------------------------------------------

def test_regularization_check_passes_with_weights_and_fails_without(compose_config):
    reg = compose_config(["reg.l2=0.01"]).reg
    x, y = blobs()
    model = TwoLayer()
    assert check_regularization(model, nn.CrossEntropyLoss(), Regularizer(reg, model), x, y, "l2").status == PASS
    # a model with no weight tensors (biases only): the L2 term adds nothing
    biases = nn.Sequential(nn.Flatten(), nn.Identity())
    biases.register_parameter("bias", nn.Parameter(torch.zeros(4)))
    biases.forward = lambda inp: biases.bias.expand(len(inp), 4)
    assert check_regularization(biases, nn.CrossEntropyLoss(), Regularizer(reg, biases), x, y, "l2").status == FAIL


# --- check 3: overfit a tiny subset ---------------------------------------------------------------

def test_overfit_passes_for_a_real_model_and_fails_when_the_output_ignores_the_input():
    torch.manual_seed(0)
    x, y = blobs(n=20, classes=4)
    model = TwoLayer()
    good = check_overfit(model, nn.CrossEntropyLoss(), x, y, torch.optim.Adam(model.parameters(), 1e-2), 300)
    assert good.status == PASS and "100%" in good.detail
    broken = IgnoresInput(12, 4)
    bad = check_overfit(broken, nn.CrossEntropyLoss(), x, y, torch.optim.Adam(broken.parameters(), 1e-2), 300)
    assert bad.status == FAIL and "25%" in bad.detail  # a constant prediction gets one class of four right


def test_overfit_reports_a_non_finite_loss():
    x, y = blobs(n=20)
    model = TwoLayer()
    check = check_overfit(model, nn.CrossEntropyLoss(), x * 1e30, y, torch.optim.SGD(model.parameters(), 1e10), 50)
    assert check.status == FAIL


def test_tiny_subset_takes_every_class_before_repeating_one():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    chosen = tiny_subset(labels, n=6)
    assert len(chosen) == 6 and set(labels[chosen].tolist()) == {0, 1, 2, 3}
    assert len(tiny_subset(labels, n=50)) == len(labels)


def test_sanity_checks_pass_on_the_default_model_and_keep_the_rng(compose_config):
    cfg = compose_config(["data.batch_size=64"])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    checks = sanity_checks(cfg)
    assert [c.status for c in checks] == [PASS, PASS, PASS], [c.line for c in checks]
    assert torch.equal(torch.rand(3), expected_next)  # a training run after the checks starts as without them
    ok, line = verdict(checks)
    assert ok and line == "sanity: all 3 checks passed"


def test_verdict_names_the_failed_checks():
    ok, line = verdict([Check(PASS, "a", ""), Check(FAIL, "overfit a tiny subset", "")])
    assert not ok and "1 of 2" in line and "overfit a tiny subset" in line


# --- gradient check -------------------------------------------------------------------------------

def test_relative_error_is_symmetric_and_floored():
    assert relative_error(1.0, 1.0) == 0
    assert relative_error(1.0, 2.0) == relative_error(2.0, 1.0) == 0.5
    assert relative_error(0.0, 0.0) == 0


def test_gradcheck_passes_a_correct_backward_and_fails_a_planted_wrong_one():
    torch.manual_seed(0)
    x, y = blobs(n=4)
    right = gradcheck(TwoLayer(), lambda s: F.cross_entropy(s, y), x, entries=6)
    ok, line = gradcheck_verdict(right)
    assert ok, line
    assert max(r.max_rel_error for r in right) < 1e-6

    torch.manual_seed(0)
    wrong = gradcheck(TwoLayer(relu=WrongReLU.apply), lambda s: F.cross_entropy(s, y), x, entries=6)
    ok, line = gradcheck_verdict(wrong)
    assert not ok and "[FAIL]" in line and "fc1" in line
    assert {r.name for r in wrong if not r.passed} <= {"fc1.weight", "fc1.bias"}
    assert all(r.passed for r in wrong if r.name.startswith("fc2"))  # fc2's gradient does not go through the ReLU


def test_gradcheck_sets_kinks_aside_instead_of_failing():
    # the hinge loss at an exact margin boundary: scores 1 apart, so the margin term sits at 0
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    results = gradcheck(model, lambda s: F.multi_margin_loss(s, y), x, entries=4, h=1e-3)
    assert sum(r.kinks for r in results) >= 1
    assert gradcheck_verdict(results)[0]


FAST_FAMILIES = ["linear", "svm", "mlp", "mlp model.activation=maxout", "mlp model.activation=tanh",
                 "mlp model.batch_norm=true model.dropout=0.5", "lenet", "lenet model.variant=classic",
                 "alexnet", "vgg11", "nin", "resnet20"]
SLOW_FAMILIES = ["vgg11 model.batch_norm=true", "vgg16", "resnet18", "resnet50", "googlenet", "densenet121"]


@pytest.mark.parametrize("model", FAST_FAMILIES + [pytest.param(m, marks=pytest.mark.slow) for m in SLOW_FAMILIES])
def test_gradcheck_passes_on_every_model_family(compose_config, model):
    name, *options = model.split()
    cfg = compose_config(["task=gradcheck", "task.entries=1", "task.examples=2", f"model={name}", *options, *SYNTHETIC])
    lines = []
    gradcheck_task.run(cfg, None, emit=lines.append)  # raises ChecksFailed when it fails
    assert lines[-1].startswith("[PASS] gradcheck")


def test_gradcheck_task_raises_checks_failed_on_a_planted_bug(compose_config, monkeypatch):
    cfg = compose_config(["task=gradcheck", "model=mlp", *SYNTHETIC])
    monkeypatch.setattr(torch.nn.ReLU, "forward", lambda self, x: WrongReLU.apply(x))
    lines = []
    with pytest.raises(ChecksFailed, match=r"\[FAIL\] gradcheck"):
        gradcheck_task.run(cfg, None, emit=lines.append)
    assert lines[-1].startswith("[FAIL] gradcheck")


def test_gradcheck_skips_knn(compose_config):
    lines = []
    gradcheck_task.run(compose_config(["task=gradcheck", "model=knn"]), None, emit=lines.append)
    assert lines == ["[SKIP] gradcheck: knn has no trained parameters or gradients: nothing to check"]


# --- the command line -----------------------------------------------------------------------------

def test_cli_sanity_and_gradcheck_exit_status(start_cli, tmp_path):
    for name in ("sanity_ok", "sanity_fail", "gradcheck", "train_gated"):
        (tmp_path / name).mkdir()
    runs = {name: start_cli(args, tmp_path / name) for name, args in {
        "sanity_ok": ["task=sanity", "model=mlp"],
        "sanity_fail": ["task=sanity", "model=mlp", "optim.lr=1e-9"],  # nothing moves: it cannot overfit (lr=0 is an error)
        "gradcheck": ["task=gradcheck", "model=svm"],
        "train_gated": ["model=mlp", "optim.lr=1e-9", "trainer.sanity=true", "trainer.epochs=1"],
    }.items()}
    ok = runs["sanity_ok"].result()
    assert ok.proc.returncode == 0, ok.output
    assert "[PASS] initial loss" in ok.output and "ln(10) = 2.3026" in ok.output
    assert "sanity: all 3 checks passed" in ok.output

    failed = runs["sanity_fail"].result()
    assert failed.proc.returncode == 1, failed.output
    assert "[FAIL] overfit a tiny subset" in failed.output and "1 of 3 checks FAILED" in failed.output

    grad = runs["gradcheck"].result()
    assert grad.proc.returncode == 0, grad.output
    assert "[PASS] gradcheck" in grad.output and "max rel error" in grad.output

    gated = runs["train_gated"].result()
    assert gated.proc.returncode == 2, gated.output
    assert "trainer.sanity" in gated.output and "trainer.sanity=false" in gated.output
    assert not list((tmp_path / "train_gated").rglob("last.pt"))  # stopped before any training
