"""task=gradcheck: the analytic gradient (autograd) of data loss + regularization is compared with
centred differences (L(w + h) - L(w - h)) / 2h in float64, on task.examples random inputs of
the data's geometry, for up to task.entries entries of every parameter tensor: the entry with
the largest gradient, entries drawn among those with a sizable gradient and entries drawn among all.
Relative error per entry: |a - n| / max(|a|, |n|, floor). Reading (CS231n):
    < 1e-7 good; 1e-7..1e-4 fine with kinks or deep nets; 1e-4..1e-2 uncomfortable; > 1e-2 wrong.
Kinks (ReLU, max-pool, hinge, |w|) make the loss non-differentiable at points; when w - h and w + h
straddle one, the centred difference averages two slopes. Such an entry is recognised by the
one-sided differences (L(w + h) - L(w)) / h and (L(w) - L(w - h)) / h: if they differ and the
analytic gradient lies between them, the difference is explained by the kink and the entry is set
aside (counted, not failed). An entry that still disagrees is measured again at h / RETRY_SHRINK: in a
deep network one weight moves thousands of ReLU inputs, so several kinks can sit within h; 1000x closer
they are 1000x less likely, while a wrong gradient stays as wrong (float64 keeps the smaller difference
accurate to about 1e-7). The check passes when no tensor's max relative error exceeds
GRADCHECK_THRESHOLD.
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from cvtrain import ChecksFailed
from cvtrain.device import resolve_device
from cvtrain.losses import Regularizer, build_loss
from cvtrain.models import build_model, model_kind
from cvtrain.table import format_table
from cvtrain.tasks.sanity import describe
from cvtrain.tasks.summary import data_geometry

GRADCHECK_H = 1e-6
GRADCHECK_FLOOR = 1e-10  # denominator floor of the relative error (gradients below it count as 0)
GRADCHECK_THRESHOLD = 1e-4  # pass: every tensor's max relative error below this
RETRY_SHRINK = 1000  # an entry the centred difference and the one-sided test cannot explain: again at h / this
READING = ((1e-7, "good"), (1e-4, "ok"), (1e-2, "uncomfortable"), (math.inf, "WRONG"))


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


def gradcheck(model: nn.Module, objective, x: torch.Tensor, entries: int = 4,
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
                    # several kinks within h (a deep net: one weight moves thousands of ReLU inputs): measure
                    # again 1000x closer, where a kink is 1000x less likely; a wrong gradient stays wrong there
                    small = h / RETRY_SHRINK
                    flat_p[i] = original + small
                    plus = loss_at()
                    flat_p[i] = original - small
                    minus = loss_at()
                    flat_p[i] = original
                    if relative_error(a, (plus - minus) / (2 * small), floor) < err:
                        numerical = (plus - minus) / (2 * small)
                        err = relative_error(a, numerical, floor)
                        result.kinks += err <= GRADCHECK_THRESHOLD
                if err >= result.max_rel_error:
                    result.max_rel_error = err
                    result.worst = {"index": i, "analytic": a, "numerical": numerical}
            results.append(result)
    return results


def format_gradcheck(results: list) -> list:
    """The table lines and the reading, without the verdict."""
    rows = [(r.name, "x".join(map(str, r.shape)) or "scalar", r.checked, f"{r.max_rel_error:.1e}",
             r.kinks or "", r.reading) for r in results]
    header = ("parameter", "shape", "checked", "max rel error", "kinks", "reading")
    lines = format_table(header, rows, right=(2, 3, 4)).split("\n")
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


def run(cfg, run_dir: Path, emit=print) -> None:
    """The task: the table for cfg's model and loss (+ the configured regularization) on task.examples
    random inputs of the data's geometry, then the verdict; ChecksFailed (exit status 1) when it fails."""
    if model_kind(cfg.model.name) != "trained":
        emit(f"[SKIP] gradcheck: {cfg.model.name} has no trained parameters or gradients: nothing to check")
        return
    examples, entries = cfg.task.examples, cfg.task.entries
    device = resolve_device(cfg.trainer.device)
    shape, num_classes = data_geometry(cfg.data)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model, shape, num_classes).to(device)
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
    emit(f"gradcheck: {describe(cfg, shape, num_classes, device)}{' + regularization' if regularizer else ''}; "
         f"{examples} random inputs, float64, centred differences h={GRADCHECK_H:g}, up to {entries} entries "
         f"of each of {n_params} parameter tensors (eval mode: dropout off, batch norm fixed to this batch's "
         f"statistics)")
    results = gradcheck(model, objective, x, entries=entries, seed=cfg.trainer.seed)
    for line in format_gradcheck(results):
        emit(line)
    ok, line = gradcheck_verdict(results)
    emit(f"{line} ({time.perf_counter() - start:.1f} s)")
    if not ok:
        raise ChecksFailed(line)
