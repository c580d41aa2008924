"""Babysitting before training: the course's sanity checks (task=sanity, trainer.sanity=true)
and a numerical gradient check (task=gradcheck), for the configured model, loss and data.

Sanity checks, one line each ([PASS] / [FAIL] / [SKIP]):

  initial loss    with regularization off, the data loss of the freshly initialized model on a
                  batch of training data is the loss of a random predictor: ln C for softmax
                  cross-entropy, (C - 1) * margin for the hinge loss, (C - 1) * margin^2 for the
                  squared hinge, 1 for mse on one-hot targets. These values hold at zero scores
                  ("small weights"), so the check scales the output layer (the last Linear/Conv
                  of the forward pass) by OUTPUT_SCALE: every layer still runs, but the scores
                  are ~0. Tolerance: INITIAL_LOSS_RTOL relative. The loss at the configured
                  init, unscaled, is printed beside it (large initial scores make it higher).
  regularization  turning regularization on raises the loss (the configured reg.l2 / reg.l1,
                  or reg.l2=DEFAULT_L2 when both are 0).
  overfit         with regularization and dropout off, the model reaches 100% training accuracy
                  on OVERFIT_EXAMPLES training images (a few per class) within OVERFIT_STEPS
                  full-batch steps of the configured optimizer (weight decay 0, constant lr).

Gradient check: the analytic gradient (autograd) of data loss + regularization is compared with
centred differences (L(w + h) - L(w - h)) / 2h in float64, on GRADCHECK_EXAMPLES random inputs of
the data's geometry, for up to GRADCHECK_ENTRIES entries of every parameter tensor: the entry with
the largest gradient, entries drawn among those with a sizable gradient and entries drawn among all.
Relative error per entry: |a - n| / max(|a|, |n|, floor). Reading (CS231n):
    < 1e-7 good; 1e-7..1e-4 fine with kinks or deep nets; 1e-4..1e-2 uncomfortable; > 1e-2 wrong.
Kinks (ReLU, max-pool, hinge, |w|) make the loss non-differentiable at points; when w - h and w + h
straddle one, the centred difference averages two slopes. Such an entry is recognised by the
one-sided differences (L(w + h) - L(w)) / h and (L(w) - L(w - h)) / h: if they differ and the
analytic gradient lies between them, the difference is explained by the kink and the entry is set
aside (counted, not failed). The check passes when no tensor's max relative error exceeds
GRADCHECK_THRESHOLD.
"""
import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.models.init import WEIGHTED

log = logging.getLogger("cvtrain")

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

OUTPUT_SCALE = 1e-3  # initial-loss check: the output layer's weight and bias are multiplied by this
INITIAL_LOSS_RTOL = 0.02  # |measured - expected| <= 2% of expected
DEFAULT_L2 = 1e-2  # regularization check when the config has reg.l2 = reg.l1 = 0
OVERFIT_EXAMPLES = 20
OVERFIT_STEPS = 300

GRADCHECK_EXAMPLES = 2
GRADCHECK_ENTRIES = 4  # per parameter tensor
GRADCHECK_H = 1e-6
GRADCHECK_FLOOR = 1e-10  # denominator floor of the relative error (gradients below it count as 0)
GRADCHECK_THRESHOLD = 1e-4  # pass: every tensor's max relative error below this
READING = ((1e-7, "good"), (1e-4, "ok"), (1e-2, "uncomfortable"), (math.inf, "WRONG"))


@dataclass
class Check:
    """The outcome of one sanity check."""
    status: str  # PASS | FAIL | SKIP
    name: str
    detail: str

    @property
    def line(self) -> str:
        return f"[{self.status}] {self.name}: {self.detail}"


# ---------------------------------------------------------------------------------------------
# Sanity checks
# ---------------------------------------------------------------------------------------------

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


def _output_layer(model: nn.Module, x: torch.Tensor):
    """(scores, the last Linear/Conv module the forward pass called, or None)."""
    called = []
    hooks = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in model.modules()
             if isinstance(m, WEIGHTED)]
    try:
        scores = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return scores, (called[-1] if called else None)


@torch.no_grad()
def check_initial_loss(model, loss_fn, x, y, expected, scale: float = OUTPUT_SCALE,
                       rtol: float = INITIAL_LOSS_RTOL, init_name: str = "configured") -> Check:
    """Check 1: the data loss at near-zero scores against `expected` = (value, text) or None.

    The model is left as it was (the output layer's weights are restored)."""
    name = "initial loss"
    model.train()
    scores, last = _output_layer(model, x)
    at_init = loss_fn(scores, y).item()
    if expected is None:
        return Check(SKIP, name, f"no reference value for this loss (measured {at_init:.4f} at the {init_name} init)")
    value, text = expected
    if last is None:
        how = "no Linear/Conv output layer found, so measured as initialized"
        loss = at_init
    else:
        saved = [(p, p.detach().clone()) for p in last.parameters(recurse=False)]
        try:
            for p, _ in saved:
                p.mul_(scale)
            scores = model(x)
            loss = loss_fn(scores, y).item()
        finally:
            for p, original in saved:
                p.copy_(original)
        how = f"output layer scaled by {scale:g} (scores std {scores.float().std().item():.2g})"
    ok = math.isfinite(loss) and abs(loss - value) <= rtol * abs(value)
    detail = (f"{loss:.4f} vs expected {text} (tolerance {100 * rtol:g}%); {how}; "
              f"at the {init_name} init, unscaled: {at_init:.4f}")
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
    """Check 3: full-batch steps on (x, y) until the training-mode predictions are all right."""
    name = "overfit a tiny subset"
    disable_dropout(model).train()
    n, acc, loss = len(y), 0.0, float("nan")
    for step in range(steps + 1):
        scores = model(x)
        data_loss = loss_fn(scores, y)
        loss = data_loss.item()
        acc = (scores.argmax(1) == y).float().mean().item()
        if not math.isfinite(loss):
            return Check(FAIL, name, f"the loss became {loss} after {step} steps{what}; lower optim.lr")
        if acc == 1.0:
            return Check(PASS, name, f"100% of {n} training images after {step} steps{what} (loss {loss:.4f})")
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        data_loss.backward()
        optimizer.step()
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


def _without_dropout(cfg):
    """A copy of cfg whose model is built with dropout 0 (functional dropout, e.g. DenseNet's, too)."""
    cfg = copy.deepcopy(cfg)
    if "dropout" in cfg.model:
        cfg.model.dropout = 0.0
    return cfg


def _reg_for_check(reg_cfg):
    """(the reg config of check 2, its description): the configured strengths, or reg.l2=DEFAULT_L2."""
    reg_cfg = copy.deepcopy(reg_cfg)
    if reg_cfg.l2 > 0 or reg_cfg.l1 > 0:
        return reg_cfg, f"the configured reg.l2={reg_cfg.l2:g} reg.l1={reg_cfg.l1:g}"
    reg_cfg.l2 = DEFAULT_L2
    return reg_cfg, f"reg.l2={DEFAULT_L2:g} (the config has none)"


def _optimizer_for_overfit(optim_cfg, model):
    from cvtrain.optim import build_optimizer

    options = OmegaConf.to_container(optim_cfg, resolve=True)
    if "weight_decay" in options:
        options["weight_decay"] = 0.0
    optimizer = build_optimizer(options, model)
    name = options.get("_target_", "optimizer").rsplit(".", 1)[-1]
    return optimizer, f" of {name} lr {options.get('lr', optimizer.param_groups[0]['lr']):g}"


def sanity_checks(cfg, data=None, device=None) -> list:
    """The three checks for cfg's model, loss and data (loaded unless given). The global RNG
    state is left as it was, so a training run after them starts exactly as without them."""
    from cvtrain.data import InMemoryLoader, load_data
    from cvtrain.losses import Regularizer, build_loss
    from cvtrain.train import build_model, resolve_device

    if cfg.model.name == "knn":
        return [Check(SKIP, "sanity checks", "knn has no trained parameters, loss or gradients: nothing to check")]
    device = device or resolve_device(cfg.trainer.device)
    data = data or load_data(cfg.data, device)
    loss_fn = build_loss(cfg.loss)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.trainer.seed)
        model = build_model(_without_dropout(cfg), data.shape, data.num_classes).to(device)
        batch = InMemoryLoader(data.train, cfg.data.batch_size, device=device, shuffle=True, seed=cfg.trainer.seed,
                               preprocess=data.preprocess)
        x, y = next(iter(batch))
        expected = expected_initial_loss(cfg.loss, data.num_classes)
        checks = [check_initial_loss(model, loss_fn, x, y, expected, init_name=f"{cfg.model.get('init', 'default')}")]
        if expected is None:
            checks[0].detail = f"no reference value for loss {cfg.loss.name}; " + checks[0].detail
        reg_cfg, strength = _reg_for_check(cfg.reg)
        checks.append(check_regularization(model, loss_fn, Regularizer(reg_cfg, model), x, y, strength))

        subset = data.train.subset(tiny_subset(data.train.labels))
        x, y = next(iter(InMemoryLoader(subset, len(subset), device=device, preprocess=data.preprocess)))
        optimizer, what = _optimizer_for_overfit(cfg.optim, model)
        checks.append(check_overfit(model, loss_fn, x, y, optimizer, OVERFIT_STEPS, what))
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


def _header(cfg, shape, num_classes, device) -> str:
    return (f"{cfg.model.name} on {cfg.data.source} ({'x'.join(map(str, shape))}, {num_classes} classes), "
            f"loss {cfg.loss.name}, device {device}")


def sanity_task(cfg, emit=print) -> bool:
    """task=sanity: the checks, one line each, then the verdict line. True when none failed."""
    from cvtrain.data import load_data
    from cvtrain.train import resolve_device

    device = resolve_device(cfg.trainer.device)
    data = None
    if cfg.model.name != "knn":
        data = load_data(cfg.data, device)
        emit(f"sanity checks: {_header(cfg, data.shape, data.num_classes, device)}")
    checks = sanity_checks(cfg, data, device)
    for check in checks:
        emit(check.line)
    ok, line = verdict(checks)
    emit(line)
    return ok


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


# ---------------------------------------------------------------------------------------------
# Gradient check
# ---------------------------------------------------------------------------------------------

@dataclass
class TensorCheck:
    """The gradient check of one parameter tensor."""
    name: str
    shape: tuple
    checked: int = 0
    max_rel_error: float = 0.0  # over the checked entries, kinks set aside
    kinks: int = 0  # entries whose difference a kink explains
    worst: dict = field(default_factory=dict)  # the entry with max_rel_error: index, analytic, numerical

    @property
    def reading(self) -> str:
        return next(word for bound, word in READING if self.max_rel_error <= bound)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= GRADCHECK_THRESHOLD


def relative_error(a: float, n: float, floor: float = GRADCHECK_FLOOR) -> float:
    return abs(a - n) / max(abs(a), abs(n), floor)


@torch.no_grad()
def _calibrate_batch_norm(model: nn.Module, x: torch.Tensor) -> None:
    """Set every batch norm's running statistics to those of this batch, then eval mode: each
    normalization is then a fixed affine map (no mixing of the examples) with training's scale."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


def _pick_entries(grad: torch.Tensor, k: int, gen: torch.Generator) -> list:
    """Up to k flat indices: the largest |gradient|, then a draw among entries with at least 1% of
    it, then a draw among all entries (an analytic 0 where the loss does change is found there)."""
    flat = grad.detach().flatten().abs().cpu()
    n = flat.numel()
    k = min(k, n)
    chosen = [int(flat.argmax())]
    sizable = torch.nonzero(flat >= 0.01 * flat.max()).flatten() if flat.max() > 0 else torch.arange(n)
    pools = [sizable[torch.randperm(len(sizable), generator=gen)], torch.randperm(n, generator=gen)]
    want_sizable = (k - 1) - (k - 1) // 2
    for pool, want in ((pools[0], want_sizable), (pools[1], k)):
        for i in pool.tolist():
            if len(chosen) >= k or want <= 0:
                break
            if i not in chosen:
                chosen.append(i)
                want -= 1
    return chosen


def gradcheck(model: nn.Module, objective, x: torch.Tensor, entries: int = GRADCHECK_ENTRIES,
              h: float = GRADCHECK_H, seed: int = 0, floor: float = GRADCHECK_FLOOR) -> list:
    """Compare autograd with centred differences for `objective(scores) -> scalar loss` of
    `model(x)`. The model is converted to float64 in place and put in eval mode (dropout off,
    batch norm calibrated on x). Returns a TensorCheck per parameter tensor."""
    model.double()
    x = x.double()
    _calibrate_batch_norm(model, x)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def loss_at() -> float:
        return objective(model(x)).item()

    with torch.enable_grad():
        loss = objective(model(x))
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    base = loss.item()
    gen = torch.Generator().manual_seed(seed)
    results = []
    with torch.no_grad():
        for (name, p), grad in zip(params, grads):
            grad = torch.zeros_like(p) if grad is None else grad
            result = TensorCheck(name, tuple(p.shape))
            flat_p, flat_g = p.view(-1), grad.reshape(-1)
            for i in _pick_entries(grad, entries, gen):
                original = flat_p[i].item()
                flat_p[i] = original + h
                plus = loss_at()
                flat_p[i] = original - h
                minus = loss_at()
                flat_p[i] = original
                a, numerical = flat_g[i].item(), (plus - minus) / (2 * h)
                err = relative_error(a, numerical, floor)
                result.checked += 1
                if err > READING[0][0]:
                    forward, backward = (plus - base) / h, (base - minus) / h
                    slack = 1e-6 * max(abs(forward), abs(backward)) + floor
                    if min(forward, backward) - slack <= a <= max(forward, backward) + slack:
                        result.kinks += 1  # the analytic slope is one of the two sides of a kink
                        continue
                if err >= result.max_rel_error:
                    result.max_rel_error = err
                    result.worst = {"index": i, "analytic": a, "numerical": numerical}
            results.append(result)
    return results


def format_gradcheck(results: list) -> list:
    """The table lines and the reading, without the verdict."""
    rows = [(r.name, "x".join(map(str, r.shape)) or "scalar", str(r.checked), f"{r.max_rel_error:.1e}",
             str(r.kinks) if r.kinks else "", r.reading) for r in results]
    header = ("parameter", "shape", "checked", "max rel error", "kinks", "reading")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.rjust(w) if 2 <= i <= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [fmt(header), "-" * len(fmt(header)), *map(fmt, rows)]
    kinks = sum(r.kinks for r in results)
    lines.append("reading (CS231n): relative error < 1e-7 good (smooth functions in float64); 1e-7..1e-4 ok with "
                 "kinks (ReLU, max-pool, hinge) or a deep net; 1e-4..1e-2 uncomfortable; > 1e-2 the gradient is "
                 "probably wrong")
    if kinks:
        lines.append(f"kinks: {kinks} entries sat within h of a kink (the one-sided differences disagree and the "
                     "analytic gradient lies between them), so the centred difference averaged two slopes; "
                     "they are set aside")
    return lines


def gradcheck_verdict(results: list) -> tuple[bool, str]:
    worst = max(results, key=lambda r: r.max_rel_error, default=None)
    entries = sum(r.checked for r in results)
    failed = [r for r in results if not r.passed]
    if worst is None:
        return True, "gradcheck: the model has no trainable parameters: nothing to check"
    summary = (f"max relative error {worst.max_rel_error:.1e} ({worst.name}) over {len(results)} tensors, "
               f"{entries} entries; threshold {GRADCHECK_THRESHOLD:g}")
    if failed:
        names = ", ".join(r.name for r in failed[:5]) + (", ..." if len(failed) > 5 else "")
        w = failed[0].worst
        return False, (f"[FAIL] gradcheck: {summary}; wrong in {len(failed)} tensor(s): {names} (e.g. "
                       f"{failed[0].name}[{w.get('index')}]: analytic {w.get('analytic', 0):.6g}, "
                       f"numerical {w.get('numerical', 0):.6g})")
    return True, f"[PASS] gradcheck: {summary}"


def gradcheck_task(cfg, emit=print, entries: int = GRADCHECK_ENTRIES, examples: int = GRADCHECK_EXAMPLES) -> bool:
    """task=gradcheck: the table for cfg's model and loss (+ the configured regularization) on random
    inputs of the data's geometry. True when it passes."""
    from cvtrain.losses import Regularizer, build_loss
    from cvtrain.summary import data_geometry
    from cvtrain.train import build_model, resolve_device

    if cfg.model.name == "knn":
        emit("[SKIP] gradcheck: knn has no trained parameters or gradients: nothing to check")
        return True
    device = resolve_device(cfg.trainer.device)
    shape, num_classes = data_geometry(cfg.data)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, shape, num_classes).to(device)
    gen = torch.Generator().manual_seed(cfg.trainer.seed)
    x = torch.randn(examples, *shape, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(num_classes, (examples,), generator=gen).to(device)
    loss_fn = build_loss(cfg.loss)
    model.double()
    regularizer = Regularizer(cfg.reg, model)

    def objective(scores):
        loss = loss_fn(scores, y)
        return loss + regularizer() if regularizer else loss

    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    emit(f"gradcheck: {_header(cfg, shape, num_classes, device)}{' + regularization' if regularizer else ''}; "
         f"{examples} random inputs, float64, centred differences h={GRADCHECK_H:g}, up to {entries} entries "
         f"of each of {n_params} parameter tensors (eval mode: dropout off, batch norm fixed to this batch's "
         f"statistics)")
    results = gradcheck(model, objective, x, entries=entries, seed=cfg.trainer.seed)
    for line in format_gradcheck(results):
        emit(line)
    ok, line = gradcheck_verdict(results)
    emit(f"{line} ({time.perf_counter() - start:.1f} s)")
    return ok
