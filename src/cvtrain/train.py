"""The training loop: fit / evaluate / checkpoint / resume. Read it top to bottom."""
import json
import math
import shutil
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from cvtrain import TrainingDiverged, UserError
from cvtrain.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cvtrain.data import BatchAugment, InMemoryLoader, load_data
from cvtrain.data.augment import BatchMix, mix_generator
from cvtrain.diagnostics import require_sanity
from cvtrain.losses import Regularizer, build_loss
from cvtrain.models import create_model, init_weights
from cvtrain.models.knn import run_knn
from cvtrain.monitor import RunLogger, TrainingMonitor, run_hparams
from cvtrain.optim import build_optimizer, build_scheduler

log = logging.getLogger("cvtrain")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device={name} is not a device; use auto, cpu, cuda or cuda:N") from None


def build_model(cfg, shape, num_classes) -> torch.nn.Module:
    """The configured model for images of `shape` (C, H, W), initialized per model.init."""
    options = OmegaConf.to_container(cfg.model, resolve=True)
    name, scheme, bias_init = options.pop("name"), options.pop("init", "default"), options.pop("bias_init", 0.0)
    model = create_model(name, shape, num_classes, **options)
    init_weights(model, scheme, bias_init)
    return model


@torch.no_grad()
def evaluate(model, loader, loss_fn) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole loader."""
    model.eval()
    total_loss = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    for x, y in loader:
        out = model(x)
        total_loss += loss_fn(out, y) * len(y)
        correct += (out.argmax(1) == y).sum()
    n = len(loader.labels)
    return total_loss.item() / n, correct.item() / n


def _flush_losses(logger, monitor, pending: dict, first: int) -> float:
    """Write the per-step losses gathered since step `first` (one host sync); return the last loss.
    Stops the run (TrainingDiverged) when the loss is non-finite or exploded."""
    for tag, values in pending.items():
        if values:
            values = torch.stack(values).tolist()
            if tag == "train/loss":
                monitor.check_losses(values, first)
                last = values[-1]
            logger.series(tag, values, first)
    return last


def train_one_epoch(model, loader, loss_fn, regularizer, optimizer, scheduler, monitor, logger, step, cfg, desc):
    """One pass over the training data. Returns (mean loss, accuracy, next step)."""
    model.train()
    pending = {"train/loss": [], "train/data_loss": [], "train/reg_loss": []}  # flushed every log_every steps
    pending_lr, first = [], step
    total_loss = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    seen = 0
    mix, mix_gen = BatchMix(cfg.aug), mix_generator(cfg.trainer.seed, step)  # aug.mixup_alpha / aug.cutmix_alpha
    show_bar = cfg.trainer.progress and sys.stderr.isatty()
    with tqdm(total=len(loader), desc=desc, disable=not show_bar, leave=False, unit="batch") as bar:
        for i, (x, y) in enumerate(loader):
            monitor.before_forward(step)
            if mix:  # y stays each image's own label (accuracy counts against it), y_b the mixed-in one's
                x, y, y_b, lam = mix(x, y, mix_gen)
                out = model(x)
                data_loss = lam * loss_fn(out, y) + (1 - lam) * loss_fn(out, y_b)
            else:
                out = model(x)
                data_loss = loss_fn(out, y)
            if regularizer:
                reg_loss = regularizer()
                loss = data_loss + reg_loss
                pending["train/data_loss"].append(data_loss.detach())
                pending["train/reg_loss"].append(reg_loss.detach())
            else:
                loss = data_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            regularizer.clip_grad_()  # reg.grad_clip: the global gradient norm, before the step
            monitor.before_step(step)
            pending_lr.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            regularizer.project_()  # reg.max_norm: each unit's incoming weights back into the ball
            scheduler.step_batch()
            monitor.after_step(step, pending_lr[-1])

            pending["train/loss"].append(loss.detach())
            total_loss += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
            step += 1
            bar.update()
            if len(pending_lr) >= cfg.trainer.log_every or i == len(loader) - 1:
                last_loss = _flush_losses(logger, monitor, pending, first)
                logger.series("opt/lr", pending_lr, first)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                pending = {tag: [] for tag in pending}
                pending_lr, first = [], step
    return total_loss.item() / seen, correct.item() / seen, step


def train(cfg, run_dir: Path, choices: dict | None = None) -> dict:
    """Train cfg.model on cfg.data; write checkpoints, TensorBoard and metrics into run_dir, and at the
    end (trainer.viz) the visualizations of the best checkpoint (see _visualize)."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.trainer.device)
    resume = load_checkpoint(cfg.trainer.resume) if cfg.trainer.resume else None
    if resume and resume["epoch"] >= cfg.trainer.epochs:
        raise UserError(f"{cfg.trainer.resume} already holds {resume['epoch']} epochs; "
                        f"set trainer.epochs above that to train on")
    torch.manual_seed(cfg.trainer.seed)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    if cfg.model.name == "knn":  # non-parametric: no optimizer loop
        return run_knn(cfg, run_dir, device, lambda data: RunLogger(run_dir, run_hparams(plain_cfg, choices or {})))

    if cfg.trainer.epochs < 1:
        raise UserError(f"trainer.epochs={cfg.trainer.epochs}: train for at least 1 epoch")
    augment = BatchAugment(cfg.aug)  # checks the aug values before any data is loaded
    # data.preprocess is fitted on the training split (whitening on device)
    data = load_data(cfg.data, device, need_test=cfg.trainer.test)
    if cfg.trainer.sanity:
        require_sanity(cfg, data, device)  # initial loss, regularization, overfit a tiny subset
    model = build_model(cfg, data.shape, data.num_classes).to(device)
    loss_fn = build_loss(cfg.loss)
    regularizer = Regularizer(cfg.reg, model)
    optimizer = build_optimizer(cfg.optim, model)
    train_loader = InMemoryLoader(data.train, cfg.data.batch_size, device=device, shuffle=True,
                                  preprocess=data.preprocess,  # applied after augmentation
                                  augment=augment, seed=cfg.trainer.seed, drop_last=True)
    val_loader = InMemoryLoader(data.val, cfg.data.eval_batch_size, device=device, preprocess=data.preprocess)
    scheduler = build_scheduler(cfg.sched, optimizer, cfg.trainer.epochs, len(train_loader))
    start_epoch, step, best_val_acc, best_epoch, val_acc = 0, 0, -1.0, 0, float("nan")
    if resume:
        _restore(resume, cfg, model, optimizer, scheduler)
        _carry_best_checkpoint(Path(cfg.trainer.resume), run_dir)
        start_epoch, step = resume["epoch"], resume["step"]
        best_val_acc, best_epoch = resume["best_val_acc"], resume["best_epoch"]
        log.info("resumed from %s at epoch %d", cfg.trainer.resume, start_epoch)

    params = sum(p.numel() for p in model.parameters())
    logger = RunLogger(run_dir, run_hparams(plain_cfg, choices or {}))
    monitor = TrainingMonitor(model, cfg.trainer, logger)
    data_meta = {"mean": data.mean, "std": data.std, "preprocess": data.preprocess.state_dict(),
                 "classes": list(data.classes), "shape": list(data.shape)}
    log.info("%s: %d parameters | data %s %s, %d train / %d val images | device %s | run dir %s",
             cfg.model.name, params, cfg.data.source, data.shape, len(data.train), len(data.val), device, run_dir)

    train_time, train_images, start = 0.0, 0, time.perf_counter()
    for epoch in range(start_epoch, cfg.trainer.epochs):
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        try:
            train_loss, train_acc, step = train_one_epoch(
                model, train_loader, loss_fn, regularizer, optimizer, scheduler, monitor, logger, step, cfg,
                desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}")
        except TrainingDiverged as err:  # keep what the run has: its last good checkpoint, a summary
            (run_dir / "summary.json").write_text(json.dumps(
                {"status": "diverged", "reason": str(err), "epochs_completed": epoch,
                 "best_val_acc": best_val_acc if best_epoch else None, "params": params,
                 **monitor.summary()}, indent=2) + "\n")
            logger.close()
            raise
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        train_images += len(train_loader) * cfg.data.batch_size if train_loader.drop_last else len(data.train)
        val_loss, val_acc = evaluate(model, val_loader, loss_fn)
        scheduler.step_epoch(val_loss, val_acc)  # epoch-interval schedules and sched=plateau act here

        record = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "train_acc": train_acc,
                  "val_loss": val_loss, "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                  "epoch_time_s": epoch_time}
        logger.scalars({"train/acc": train_acc, "val/loss": val_loss, "val/acc": val_acc}, step)
        logger.epoch_record(record)
        log.info("epoch %d/%d  train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | lr %.3g | %.1fs",
                 epoch + 1, cfg.trainer.epochs, train_loss, 100 * train_acc, val_loss, 100 * val_acc,
                 record["lr"], epoch_time)

        improved = val_acc > best_val_acc
        if improved:
            best_val_acc, best_epoch = val_acc, epoch + 1
        if cfg.trainer.checkpoint:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step,
                     "best_val_acc": best_val_acc, "best_epoch": best_epoch, "rng": rng_state(),
                     "config": plain_cfg, "data": data_meta}
            save_checkpoint(run_dir / "checkpoints" / "last.pt", state)
            if improved:
                save_checkpoint(run_dir / "checkpoints" / "best.pt", state)

    summary = {"status": "completed", "best_val_acc": best_val_acc, "best_epoch": best_epoch, "final_val_acc": val_acc,
               "epochs": cfg.trainer.epochs, "train_time_s": round(time.perf_counter() - start, 3),
               "train_images_per_s": round(train_images / max(train_time, 1e-9), 1), "params": params,
               "device": str(device), **monitor.summary()}
    weights = _load_best(cfg, run_dir, model, device) if cfg.trainer.test or cfg.trainer.viz else "final"
    if cfg.trainer.test:
        summary["test_acc"] = _test(cfg, model, data, loss_fn, device, weights)
    if cfg.trainer.viz:
        _visualize(model, data, val_loader, logger.writer, run_dir, step, weights)
    logger.summary(summary, step)
    logger.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done: best val acc %.2f%% (epoch %d)%s | %.1f s, %.0f train images/s | %s",
             100 * best_val_acc, best_epoch,
             f" | test acc {100 * summary['test_acc']:.2f}%" if "test_acc" in summary else "",
             summary["train_time_s"], summary["train_images_per_s"], run_dir)
    return summary


def _restore(state, cfg, model, optimizer, scheduler) -> None:
    for group in ("model", "optim"):
        saved, current = state["config"][group], OmegaConf.to_container(cfg[group], resolve=True)
        if saved.get("name", saved.get("_target_")) != current.get("name", current.get("_target_")) or (
                group == "model" and saved != current):
            raise UserError(f"trainer.resume: the checkpoint was trained with {group} {saved}, but this run "
                            f"asks for {current}; resume with the same {group} settings")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"trainer.resume: the checkpoint's weights do not fit this model on this data "
                        f"(trained on images {state['data']['shape']}): {str(err).splitlines()[-1].strip()}") from None
    # the optimizer's state (momentum, Adam moments) comes back; its settings (lr, betas, ...) are this run's
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # e.g. another optim.decay_norm_and_bias: other parameter groups
        raise UserError(f"trainer.resume: the checkpoint's optimizer state does not fit this optimizer ({err}); "
                        "resume with the same optim settings") from None
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    # continue at the saved step and epoch (and plateau state), on this run's schedule shape:
    # its optim.lr, and a longer trainer.epochs stretches it
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def _carry_best_checkpoint(resume_path: Path, run_dir: Path) -> None:
    """A resumed run dir starts with the best checkpoint so far, so it is complete on its own."""
    best = resume_path.parent / "best.pt"
    if best.is_file() and best.resolve() != (run_dir / "checkpoints" / "best.pt").resolve():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy2(best, run_dir / "checkpoints" / "best.pt")


def _load_best(cfg, run_dir, model, device) -> str:
    """Put the best checkpoint's weights into `model` (once, for the test split and the visualizations);
    returns which weights the model now holds: "best", or "final" without trainer.checkpoint."""
    best = run_dir / "checkpoints" / "best.pt"
    if not (cfg.trainer.checkpoint and best.exists()):
        return "final"
    model.load_state_dict(load_checkpoint(best, map_location=device)["model"])
    return "best"


def _visualize(model, data, val_loader, writer, run_dir, step, weights: str) -> None:
    """trainer.viz: filters or templates, confusion matrix, misclassified images and the projector
    (src/cvtrain/viz.py) to TensorBoard and <run dir>/viz/, drawn from `model` as it is (`weights`:
    the best checkpoint's, or the final model's without trainer.checkpoint).
    A failure here is logged, not raised: the training run itself is complete."""
    try:
        from cvtrain.viz import write_visualizations  # imports matplotlib: only when used

        files = write_visualizations(model, val_loader, data, writer, run_dir, step)
        log.info("visualizations of the %s model: %s in %s", weights, ", ".join(files), run_dir / "viz")
    except Exception as err:  # noqa: BLE001
        log.warning("visualizations failed (trainer.viz=false skips them): %s", err, exc_info=True)


def _test(cfg, model, data, loss_fn, device, weights: str) -> float:
    """Accuracy of `model` (holding the `weights` checkpoint) on the test split."""
    loader = InMemoryLoader(data.test, cfg.data.eval_batch_size, device=device, preprocess=data.preprocess)
    test_loss, test_acc = evaluate(model, loader, loss_fn)
    log.info("test (%s model): loss %.4f acc %.2f%% on %d images", weights, test_loss, 100 * test_acc,
             len(data.test))
    return test_acc
