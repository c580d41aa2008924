"""task=sanity (and trainer.sanity=true): the course's sanity checks for the configured model, loss
and data, one line each ([PASS] / [FAIL] / [SKIP]):

  initial loss    with regularization off, the data loss of the freshly initialized model, as
                  configured (model.init), on a batch of training data is the loss of a random
                  predictor: ln C for softmax cross-entropy, (C - 1) * margin for the hinge loss,
                  (C - 1) * margin^2 for the squared hinge, 1 for mse on one-hot targets. These
                  values hold at scores near 0, which every init gives: the final classifier layer
                  starts small (cvtrain/models/init.py). Tolerance: INITIAL_LOSS_RTOL relative.
  regularization  turning regularization on raises the loss (the configured reg.l2 / reg.l1,
                  or reg.l2=DEFAULT_L2 when both are 0).
  overfit         with regularization and dropout off, the model reaches 100% training accuracy
                  on task.overfit_examples training images (a few per class) within
                  task.overfit_steps full-batch steps of the configured optimizer (weight decay 0,
                  constant lr), taken with the training loop's own step (cvtrain/loop.py).
"""
import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from cvtrain import ChecksFailed, UserError
from cvtrain.data import InMemoryLoader, load_data
from cvtrain.device import resolve_device
from cvtrain.loop import training_step
from cvtrain.losses import Regularizer, build_loss
from cvtrain.models import build_model, model_kind
from cvtrain.optim import build_optimizer

log = logging.getLogger("cvtrain")

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

INITIAL_LOSS_RTOL = 0.10  # |measured - expected| <= 10% of expected
DEFAULT_L2 = 1e-2  # regularization check when the config has reg.l2 = reg.l1 = 0
OVERFIT_EXAMPLES = 20  # defaults of sanity_checks() when called without the task's keys (trainer.sanity)
OVERFIT_STEPS = 300


@dataclass
class Check:
    """The outcome of one sanity check."""
    status: str  # PASS | FAIL | SKIP
    name: str
    detail: str

    @property
    def line(self) -> str:
        return f"[{self.status}] {self.name}: {self.detail}"


def expected_initial_loss(loss_cfg, num_classes: int):
    """(value, how it is computed) of a random predictor's loss at zero scores, or None if unknown."""
    name, c = loss_cfg.name, num_classes
    margin = float(loss_cfg.get("margin", 1.0))
    if name == "cross_entropy":  # label smoothing mixes -log p_j terms, all ln C at uniform p
        return math.log(c), f"ln({c}) = {math.log(c):.4f}"
    if name == "hinge":
        return (c - 1) * margin, f"(C-1)*margin = {c - 1}*{margin:g} = {(c - 1) * margin:g}"
    if name == "squared_hinge":
        return (c - 1) * margin ** 2, f"(C-1)*margin^2 = {c - 1}*{margin:g}^2 = {(c - 1) * margin ** 2:g}"
    if name == "mse":
        return 1.0, "1 (sum_j (0 - onehot_j)^2 at zero scores)"
    return None


@torch.no_grad()
def check_initial_loss(model, loss_fn, x, y, expected, rtol: float = INITIAL_LOSS_RTOL,
                       init_name: str = "configured") -> Check:
    """Check 1: the data loss of `model` as initialized against `expected` = (value, text) or None."""
    name = "initial loss"
    model.train()
    scores = model(x)
    loss = loss_fn(scores, y).item()
    if expected is None:
        return Check(SKIP, name, f"no reference value for this loss (measured {loss:.4f} at the {init_name} init)")
    value, text = expected
    ok = math.isfinite(loss) and abs(loss - value) <= rtol * abs(value)
    detail = (f"{loss:.4f} at the {init_name} init vs expected {text} (tolerance {100 * rtol:g}%; "
              f"scores std {scores.float().std().item():.2g})")
    if not ok:
        detail += "; the scores at init are too large: scale down the final layer's init"
    return Check(PASS if ok else FAIL, name, detail)


@torch.no_grad()
def check_regularization(model, loss_fn, regularizer, x, y, strength: str) -> Check:
    """Check 2: data loss + regularizer() (as the training loop adds it) exceeds the data loss."""
    model.eval()  # the same scores for both losses (no dropout draw, no batch-norm update)
    data_loss = loss_fn(model(x), y).item()
    total = data_loss + (regularizer().item() if regularizer else 0.0)
    raised = total - data_loss
    ok = math.isfinite(total) and raised > 1e-6 * max(1.0, abs(data_loss))
    detail = f"{data_loss:.4f} -> {total:.4f} with {strength}"
    if not ok:
        detail += " (the regularization term adds nothing: does the model have weight tensors?)"
    return Check(PASS if ok else FAIL, "regularization raises the loss", detail)


def disable_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


def check_overfit(model, loss_fn, x, y, optimizer, steps: int = OVERFIT_STEPS, what: str = "") -> Check:
    """Check 3: full-batch training steps on (x, y) until the training-mode predictions are all right."""
    name = "overfit a tiny subset"
    disable_dropout(model).train()
    n, acc, loss = len(y), 0.0, float("nan")
    for step in range(steps + 1):
        out = training_step(model, x, y, loss_fn, optimizer)  # scores and loss before this step
        loss = out.data_loss.item()
        acc = (out.scores.argmax(1) == y).float().mean().item()
        if not math.isfinite(loss):
            return Check(FAIL, name, f"the loss became {loss} after {step} steps{what}; lower optim.lr")
        if acc == 1.0:
            return Check(PASS, name, f"100% of {n} training images after {step} steps{what} (loss {loss:.4f})")
    return Check(FAIL, name, f"{100 * acc:.0f}% of {n} training images after {steps} steps{what} (loss {loss:.4f}): "
                             "a model that cannot overfit a few examples has a bug, or the learning rate is off")


def tiny_subset(labels: torch.Tensor, n: int = OVERFIT_EXAMPLES) -> torch.Tensor:
    """Indices of n examples, as many per class as possible: the first of every class, then the second..."""
    per_class = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    chosen, rank = [], 0
    while len(chosen) < min(n, len(labels)):
        chosen += [int(members[rank]) for members in per_class if rank < len(members)][: n - len(chosen)]
        rank += 1
    return torch.tensor(sorted(chosen), device=labels.device)


def _without_dropout(model_cfg):
    """A copy of the model config with dropout 0 (functional dropout, e.g. DenseNet's, too)."""
    model_cfg = copy.deepcopy(model_cfg)
    if "dropout" in model_cfg:
        model_cfg.dropout = 0.0
    return model_cfg


def _reg_for_check(reg_cfg):
    """(the reg config of check 2, its description): the configured strengths, or reg.l2=DEFAULT_L2."""
    reg_cfg = copy.deepcopy(reg_cfg)
    if reg_cfg.l2 > 0 or reg_cfg.l1 > 0:
        return reg_cfg, f"the configured reg.l2={reg_cfg.l2:g} reg.l1={reg_cfg.l1:g}"
    reg_cfg.l2 = DEFAULT_L2
    return reg_cfg, f"reg.l2={DEFAULT_L2:g} (the config has none)"


def _optimizer_for_overfit(optim_cfg, model):
    options = OmegaConf.to_container(optim_cfg, resolve=True)
    if "weight_decay" in options:
        options["weight_decay"] = 0.0
    optimizer = build_optimizer(options, model)
    return optimizer, f" of {options['name']} lr {optimizer.param_groups[0]['lr']:g}"


def sanity_checks(cfg, data=None, device=None, overfit_examples: int = OVERFIT_EXAMPLES,
                  overfit_steps: int = OVERFIT_STEPS) -> list:
    """The three checks for cfg's model, loss and data (loaded unless given). The global RNG
    state is left as it was, so a training run after them starts exactly as without them."""
    if model_kind(cfg.model.name) != "trained":
        return [Check(SKIP, "sanity checks", f"{cfg.model.name} has no trained parameters, loss or gradients: "
                                             "nothing to check")]
    device = device or resolve_device(cfg.trainer.device)
    data = data or load_data(cfg.data, device)
    loss_fn = build_loss(cfg.loss)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.trainer.seed)
        model = build_model(_without_dropout(cfg.model), data.shape, data.num_classes).to(device)
        batch = InMemoryLoader(data.train, cfg.data.batch_size, device=device, shuffle=True, seed=cfg.trainer.seed,
                               preprocess=data.preprocess)
        x, y = next(iter(batch))
        expected = expected_initial_loss(cfg.loss, data.num_classes)
        checks = [check_initial_loss(model, loss_fn, x, y, expected, init_name=f"model.init={cfg.model.init}")]
        if expected is None:
            checks[0].detail = f"no reference value for loss {cfg.loss.name}; " + checks[0].detail
        reg_cfg, strength = _reg_for_check(cfg.reg)
        checks.append(check_regularization(model, loss_fn, Regularizer(reg_cfg, model), x, y, strength))

        subset = data.train.subset(tiny_subset(data.train.labels, overfit_examples))
        x, y = next(iter(InMemoryLoader(subset, len(subset), device=device, preprocess=data.preprocess)))
        optimizer, what = _optimizer_for_overfit(cfg.optim, model)
        checks.append(check_overfit(model, loss_fn, x, y, optimizer, overfit_steps, what))
    return checks


def verdict(checks: list) -> tuple[bool, str]:
    """(all passed, the final line)."""
    failed = [c.name for c in checks if c.status == FAIL]
    ran = [c for c in checks if c.status != SKIP]
    if failed:
        return False, f"sanity: {len(failed)} of {len(checks)} checks FAILED ({', '.join(failed)})"
    skipped = len(checks) - len(ran)
    return True, (f"sanity: all {len(ran)} checks passed" if ran else "sanity: nothing to check") + \
        (f" ({skipped} skipped)" if ran and skipped else "")


def describe(cfg, shape, num_classes, device) -> str:
    """`lenet on digits (1x28x28, 10 classes), loss cross_entropy, device cpu`: the header line's subject."""
    return (f"{cfg.model.name} on {cfg.data.name} ({'x'.join(map(str, shape))}, {num_classes} classes), "
            f"loss {cfg.loss.name}, device {device}")


def run(cfg, run_dir: Path, emit=print) -> None:
    """The task: the checks, one line each, then the verdict line; ChecksFailed (exit status 1) when
    one failed."""
    device = resolve_device(cfg.trainer.device)
    data = None
    if model_kind(cfg.model.name) == "trained":
        data = load_data(cfg.data, device)
        emit(f"sanity checks: {describe(cfg, data.shape, data.num_classes, device)}")
    checks = sanity_checks(cfg, data, device, cfg.task.overfit_examples, cfg.task.overfit_steps)
    for check in checks:
        emit(check.line)
    ok, line = verdict(checks)
    emit(line)
    if not ok:
        raise ChecksFailed(line)


def require_sanity(cfg, data, device) -> None:
    """trainer.sanity=true: run the checks before training (into the log); a failure stops the run."""
    checks = sanity_checks(cfg, data, device)
    for check in checks:
        (log.warning if check.status == FAIL else log.info)("%s", check.line)
    ok, line = verdict(checks)
    log.info("%s", line)
    if not ok:
        raise UserError(f"trainer.sanity: {line.removeprefix('sanity: ')}; fix them, or train anyway "
                        "with trainer.sanity=false")
