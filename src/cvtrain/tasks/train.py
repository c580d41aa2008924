"""task=train: train cfg.model on cfg.data. Three parts share one TrainState; read them top to bottom:

    setup(cfg, run_dir)   data, model, loss, optimizer, schedule, loaders, resume, logger
    fit(state)            the epochs: training steps (loop.training_step), validation, checkpoints
    finish(state)         the test split, visualizations, summary.json

train() chains them and closes the logger on every exit path; run() is the task function (it
returns the objective, the best validation accuracy). A fitted model (the registry's kind
"fitted": kNN) has no optimizer loop: run() hands it to tasks/knn.py.

Reliability, as plain code: trainer.resume=auto finds the newest good checkpoint of the run dir
(cvtrain/resume.py: find_resume), the resumed run takes the checkpoint's settings unless the command
line overrides them (resumed_config); trainer.checkpoint_every_steps writes step-<step>.pt after training_step in
train_one_epoch(), with the position inside the epoch so a resume continues at the exact batch;
SIGINT / SIGTERM set a stop flag (state.stop_signal, handlers installed at the end of setup() and
restored in train()'s finally) checked between steps: a checkpoint, summary.json "interrupted",
the command that resumes, then Interrupted (exit status 130 / 143).

Speed (cvtrain/speed.py): setup() resolves trainer.precision / channels_last / compile into
state.speed; state.net is what the loop calls (the compiled model, or the model itself) and
state.model the module whose weights are checkpointed, monitored and visualized. A compiled model is
warmed up (compiled) in setup(), timed as compile_time_s apart from the training time; the steps the
monitors measure (activation hooks) run the model uncompiled. A model with `init_from_data` (a
data-dependent init such as airbench's patch-whitening layer) gets the preprocessed training images
before the first step. trainer.lookahead_every: loop.Lookahead after each step.

Weight averaging (cvtrain/ema.py): trainer.ema=<decay> keeps an exponential moving average of the
weights (state.ema, updated after each step, after Lookahead); fit() evaluates it on val beside the
trained ("raw") weights every epoch (metrics.jsonl ema_val_loss / ema_val_acc, TensorBoard val/ema_*),
checkpoints hold it ("ema": a resume continues the average exactly), and trainer.select decides what
best.pt keeps: raw (the default), ema (the EMA's val acc decides, best.pt's "model" holds its weights,
"raw_model" the trained ones) or best (the better of the two at each epoch); summary.json says which
(best_weights). trainer.keep_snapshots=N (sched=cosine_restarts): checkpoints/snapshot-<cycle>.pt at the
ends of the last N cycles (optim.snapshot_epochs), for task=ensemble.

Several processes (torchrun --nproc_per_node=N -m cvtrain ...; cvtrain/distributed.py: state.world):
the model is wrapped in DistributedDataParallel, which averages the gradients of every step over the
processes. state.net is what the training steps call (DDP(model), compiled with trainer.compile),
state.wrapped the same uncompiled (the measured steps: DDP's all-reduce still runs, so the replicas
stay equal), state.eval_net what evaluation calls: the plain model, uncompiled (a DDP forward may
broadcast buffers, a collective a process with fewer evaluation batches would never join). Each
process trains on its share of every epoch (data/loader.py: the same permutation, every N-th image),
data.batch_size images per step, so the global batch is data.batch_size x N (optim.scale_lr=linear:
optim.lr x N); it evaluates its contiguous part of the validation split, and the sums are added up
(loop.evaluate), as are the epoch's training loss and accuracy. Only rank 0 writes: TensorBoard,
metrics.jsonl, checkpoints, visualizations, summary.json, the test split; the others have a NoLogger
and monitors that measure nothing. A stop is agreed on at every loss flush (_flush: one all_reduce of
a [diverged, signal] flag), so every process raises TrainingDiverged, or stops with a checkpoint, at
the same step. Checkpoints hold the plain model's weights and the world size: they resume in any
number of processes. A mid-epoch checkpoint resumed with another number continues at the batch that
covers the same number of images (saved batch x saved processes / processes, rounded down) on the
same permutation of the epoch: the global batches from there on are cut differently (another global
batch size), a few images of the epoch may be seen twice, the augmentation draws of ranks > 0 and
the mixing draws are not those of the uninterrupted run, and the schedule continues at the same
fraction of the epoch. trainer.sync_bn: SyncBatchNorm (CUDA).
"""
import logging
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cvtrain import Interrupted, TrainingDiverged, UserError, distributed
from cvtrain.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cvtrain.data import BatchAugment, InMemoryLoader, epoch_seed, load_data
from cvtrain.data.augment import BatchMix, mix_generator
from cvtrain.checks import check_averaging
from cvtrain.device import resolve_device
from cvtrain.ema import EMA
from cvtrain.loop import Lookahead, TTA, evaluate, training_step
from cvtrain.losses import Regularizer, build_loss
from cvtrain.models import build_model, model_kind
from cvtrain.models.transfer import prepare as prepare_transfer
from cvtrain.hparams import run_hparams
from cvtrain.monitor import Deferred, NoLogger, RunLogger, TrainingMonitor, write_summary
from cvtrain.optim import build_optimizer, build_scheduler, lr_factor, snapshot_epochs
from cvtrain.speed import Speed, resolve_speed, warm_up
from cvtrain.resume import command_line_keys, find_resume, resume_command, resumed_config
from cvtrain.tasks import knn
from cvtrain.tasks.sanity import require_sanity

log = logging.getLogger("cvtrain")


@dataclass
class TrainState:
    """Everything the three parts share: what setup() built, and the counters fit() advances."""
    cfg: Any
    run_dir: Path
    device: torch.device
    data: Any  # cvtrain.data.DataBundle
    model: torch.nn.Module
    loss_fn: Any
    regularizer: Regularizer
    optimizer: torch.optim.Optimizer
    scheduler: Any  # cvtrain.optim.Schedule
    train_loader: InMemoryLoader
    val_loader: InMemoryLoader
    speed: Speed = None
    net: Any = None  # what the loop calls: torch.compile(model) with trainer.compile, else model (DDP: of DDP(model))
    wrapped: Any = None  # the same uncompiled (the measured steps): model, or DDP(model) in several processes
    eval_net: Any = None  # what evaluation calls: net in one process, the plain model in several
    world: distributed.World = field(default_factory=distributed.World)  # this process's rank, the processes
    lookahead: Any = None  # loop.Lookahead with trainer.lookahead_every > 0
    ema: Any = None  # ema.EMA with trainer.ema > 0: the moving average of the weights
    ema_val_acc: float = math.nan  # the EMA's, of the last epoch
    best_ema_val_acc: float = -1.0
    best_weights: str = "raw"  # what best.pt holds (trainer.select): the trained weights (raw) or the EMA's
    snapshots: dict = field(default_factory=dict)  # trainer.keep_snapshots: {epoch: cycle} (optim.snapshot_epochs)
    compile_time_s: float = 0.0
    logger: RunLogger = None
    monitor: TrainingMonitor = None
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_val_acc: float = -1.0
    best_epoch: int = 0
    val_acc: float = math.nan  # of the last epoch
    train_time: float = 0.0  # seconds in training steps (not validation)
    train_images: int = 0
    started: float = field(default_factory=time.perf_counter)
    # the position inside the current epoch (a mid-epoch checkpoint holds it, a resume continues there):
    batch: int = 0  # batches of epoch `epoch` done
    totals: Any = None  # (loss sum, correct, seen) of those batches
    mix_gen: Any = None  # the mixup/cutmix generator of the epoch (aug.mixup/cutmix_alpha)
    stop_signal: Any = None  # SIGINT / SIGTERM received: stop after the current step
    signal_received: Any = None  # several processes: a signal of this one; all stop at the next flush (_flush)
    handlers: dict = field(default_factory=dict)  # the signal handlers setup() replaced
    # called as on_epoch(epoch, val_acc) after each epoch's validation and checkpoints (task=search: the
    # pruner); raising StopRun from it ends the run with summary.json status StopRun.status ("pruned")
    on_epoch: Any = None

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def setup(cfg, run_dir: Path) -> TrainState:
    """Check the config, load the data, build everything, restore a checkpoint (trainer.resume)."""
    run_dir = Path(run_dir)
    auto = cfg.trainer.resume == "auto"
    resume_path, resume = find_resume(cfg, run_dir)
    if resume:
        cfg = resumed_config(cfg, resume, command_line_keys())
        with open_dict(cfg):
            cfg.trainer.resume = str(resume_path)
        if (run_dir / ".hydra" / "config.yaml").is_file() and distributed.is_main():  # what this run really uses
            OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    world = distributed.current()
    device = _process_device(resolve_device(cfg.trainer.device), world)
    # resume=auto after a crash between the last epoch's checkpoint and summary.json: only finish() is left
    finishing = auto and resume and resume["epoch"] == cfg.trainer.epochs
    if resume and resume["epoch"] >= cfg.trainer.epochs and not finishing:
        raise UserError(f"{resume_path} already holds {resume['epoch']} epochs; "
                        f"set trainer.epochs above that to train on")
    if cfg.trainer.epochs < 1:
        raise UserError(f"trainer.epochs={cfg.trainer.epochs}: train for at least 1 epoch")
    if cfg.trainer.tta not in TTA:
        raise UserError(f"trainer.tta={cfg.trainer.tta} is unknown; choose one of {', '.join(TTA)}")
    if cfg.trainer.lookahead_every < 0 or not 0 < cfg.trainer.lookahead_alpha <= 1:
        raise UserError(f"trainer.lookahead_every={cfg.trainer.lookahead_every} must be >= 0 (0: off) and "
                        f"trainer.lookahead_alpha={cfg.trainer.lookahead_alpha} in (0, 1]")
    check_averaging(cfg.trainer)  # trainer.ema, select, keep_snapshots
    snapshots = snapshot_epochs(cfg.sched, cfg.trainer.epochs, cfg.trainer.keep_snapshots)
    speed = resolve_speed(cfg.trainer, device)  # checks the speed options before any data is loaded
    torch.manual_seed(cfg.trainer.seed)
    augment = BatchAugment(cfg.aug)  # checks the aug values before any data is loaded
    if world.rank > 0:  # rank 0 loads first: a download (data.download) or a cache file is written once
        distributed.wait_for_rank_0()
    data = load_data(cfg.data, device, need_test=cfg.trainer.test)  # data.preprocess is fitted on train
    if world.rank == 0:
        distributed.wait_for_rank_0()
    if cfg.trainer.sanity:
        require_sanity(cfg, data, device)  # initial loss, regularization, overfit a tiny subset
    model = build_model(cfg.model, data.shape, data.num_classes).to(device)
    if hasattr(model, "init_from_data") and not resume:
        model.init_from_data(_init_images(data, device))
    if cfg.trainer.sync_bn and world.size > 1:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same parameters and buffers
        else:
            log.info("note: trainer.sync_bn is ignored on the CPU (gloo has no SyncBatchNorm kernels); each process "
                     "normalizes over its own batch")
    prepare_transfer(model, cfg.model, data, fresh=not resume)  # model.pretrained (a fresh start), model.freeze
    optimizer = build_optimizer(cfg.optim, model, lr_factor(cfg.optim, world.size))  # optim.scale_lr
    train_loader = InMemoryLoader(data.train, cfg.data.batch_size, device=device, shuffle=True,
                                  preprocess=data.preprocess,  # applied after augmentation
                                  augment=augment, seed=cfg.trainer.seed, drop_last=True,
                                  placement=cfg.data.placement, rank=world.rank, world_size=world.size)
    state = TrainState(
        cfg=cfg, run_dir=run_dir, device=device, data=data, model=model, loss_fn=build_loss(cfg.loss),
        regularizer=Regularizer(cfg.reg, model), optimizer=optimizer,
        scheduler=build_scheduler(cfg.sched, optimizer, cfg.trainer.epochs, len(train_loader)),
        train_loader=train_loader,
        val_loader=InMemoryLoader(data.val, cfg.data.eval_batch_size, device=device, preprocess=data.preprocess,
                                  placement=cfg.data.placement, rank=world.rank, world_size=world.size),
        speed=speed, net=speed.prepare(model), world=world)
    if cfg.trainer.lookahead_every > 0:
        state.lookahead = Lookahead(model, cfg.trainer.lookahead_every, cfg.trainer.lookahead_alpha,
                                    cfg.trainer.epochs * len(train_loader))
    if cfg.trainer.ema > 0:  # of the weights as they are now (a resume restores its own average)
        state.ema = EMA(model, cfg.trainer.ema)
    state.snapshots = snapshots
    if resume:
        _restore(state, resume)
    _distribute(state)
    if speed.compile:
        state.compile_time_s = warm_up(state.net, model, speed, state.loss_fn, next(iter(train_loader)),
                                       next(iter(state.val_loader))[0])
        log.info("torch.compile (mode %s): %.1f s, not counted in the training time", speed.compile_mode,
                 state.compile_time_s)
    resumed_at = (resume["epoch"], resume["step"]) if resume else None  # records after it are dropped
    state.logger = RunLogger(run_dir, run_hparams(cfg), resumed_at) if world.rank == 0 else NoLogger()  # rank 0 writes
    state.monitor = TrainingMonitor(model, cfg.trainer, state.logger, measure=world.rank == 0)
    if resume and resume.get("initial_loss") is not None:  # the loss guard compares with the run's first loss,
        state.monitor.loss_guard.initial = resume["initial_loss"]  # not with the first one after the resume
    processes = f" | {world.size} processes, global batch {cfg.data.batch_size * world.size}" if world.size > 1 else ""
    log.info("%s: %d parameters | data %s %s, %d train / %d val images | device %s%s | run dir %s", cfg.model.name,
             state.params, cfg.data.name, data.shape, len(data.train), len(data.val), device, processes, run_dir)
    _install_stop_handlers(state)  # last: nothing after it raises, train()'s finally restores them
    return state


# --- resume: which checkpoint, which settings ---------------------------------------------------

def fit(state: TrainState) -> None:
    """Train from state.epoch to trainer.epochs: an epoch of steps, validation, the schedule's epoch
    step, metrics, checkpoints (last.pt every epoch, best.pt on a new best validation accuracy)."""
    cfg = state.cfg
    for epoch in range(state.epoch, cfg.trainer.epochs):
        state.train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        done = train_one_epoch(state, desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}")
        if done is None:  # SIGINT / SIGTERM: a checkpoint at this exact position, then stop
            checkpoint = checkpoint_state(state)  # every process: a mid-epoch one adds up their totals
            if state.world.rank == 0:
                save_checkpoint(state.run_dir / "checkpoints" / "last.pt", checkpoint)
            raise Interrupted(state.stop_signal, f"stopped by {signal.Signals(state.stop_signal).name} at step "
                                                 f"{state.step} (epoch {state.epoch + 1}, batch {state.batch})")
        train_loss, train_acc = done
        state.batch, state.totals, state.mix_gen = 0, None, None
        epoch_time = time.perf_counter() - t0
        state.monitor.end_epoch(state.step)  # histograms of the weights and the last step's gradients
        state.train_time += epoch_time
        state.train_images += len(state.train_loader) * cfg.data.batch_size * state.world.size  # full batches only
        if state.lookahead and state.epoch + 1 == cfg.trainer.epochs:
            state.lookahead.after_step(state.model, state.step, force=True)  # training ends on the slow weights
        # DDP broadcasts rank 0's buffers at each forward, then each process's batch norm updates its own:
        # evaluate (and checkpoint) rank 0's everywhere
        distributed.broadcast_(list(state.model.buffers()))
        val_loss, state.val_acc = evaluate(state.eval_net, state.val_loader, state.loss_fn, state.speed,
                                           cfg.trainer.tta, across_ranks=state.world.size > 1)
        state.scheduler.step_epoch(val_loss, state.val_acc)  # epoch-interval schedules and sched=plateau
        state.epoch = epoch + 1
        if state.ema:  # the moving average of the weights, evaluated as the model is (rank 0's buffers)
            distributed.broadcast_(list(state.ema.module.buffers()))
            ema_val_loss, state.ema_val_acc = evaluate(state.ema.module, state.val_loader, state.loss_fn, state.speed,
                                                       cfg.trainer.tta, across_ranks=state.world.size > 1)

        record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss, "train_acc": train_acc,
                  "val_loss": val_loss, "val_acc": state.val_acc, "lr": state.optimizer.param_groups[0]["lr"],
                  "epoch_time_s": epoch_time}
        scalars = {"train/acc": train_acc, "val/loss": val_loss, "val/acc": state.val_acc}
        if state.ema:
            record.update(ema_val_loss=ema_val_loss, ema_val_acc=state.ema_val_acc)
            scalars.update({"val/ema_loss": ema_val_loss, "val/ema_acc": state.ema_val_acc})
        state.logger.scalars(scalars, state.step)
        state.logger.epoch_record(record)
        log.info("epoch %d/%d  train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | lr %.3g | %.1fs%s",
                 state.epoch, cfg.trainer.epochs, train_loss, 100 * train_acc, val_loss, 100 * state.val_acc,
                 record["lr"], epoch_time, f" | EMA val loss {ema_val_loss:.4f} acc {100 * state.ema_val_acc:.2f}%"
                 if state.ema else "")

        improved, weights = _select(state)
        if cfg.trainer.checkpoint and state.world.rank == 0:  # at an epoch's end: no totals to add up
            checkpoint = checkpoint_state(state)
            save_checkpoint(state.run_dir / "checkpoints" / "last.pt", checkpoint)
            if improved:
                save_checkpoint(state.run_dir / "checkpoints" / "best.pt",
                                _with_ema_weights(state, checkpoint) if weights == "ema" else checkpoint)
        if state.epoch in state.snapshots and state.world.rank == 0:  # trainer.keep_snapshots: a cycle ended
            save_checkpoint(state.run_dir / "checkpoints" / f"snapshot-{state.snapshots[state.epoch]}.pt",
                            checkpoint_state(state))
        if state.on_epoch is not None:
            state.on_epoch(state.epoch, state.val_acc)


def _select(state: TrainState) -> tuple[bool, str]:
    """trainer.select after an epoch's validation: (a new best?, whose weights: raw | ema). raw: the
    trained weights' val acc decides (without trainer.ema, the only choice); ema: the moving average's;
    best: the better of the two at this epoch (raw on a tie). Updates best_val_acc, best_epoch and
    best_weights (what best.pt holds) on a new best."""
    if state.ema:
        state.best_ema_val_acc = max(state.best_ema_val_acc, state.ema_val_acc)
    select = state.cfg.trainer.select
    use_ema = state.ema is not None and (select == "ema" or (select == "best" and state.ema_val_acc > state.val_acc))
    acc, weights = (state.ema_val_acc, "ema") if use_ema else (state.val_acc, "raw")
    improved = acc > state.best_val_acc
    if improved:
        state.best_val_acc, state.best_epoch, state.best_weights = acc, state.epoch, weights
    return improved, weights


def _with_ema_weights(state: TrainState, checkpoint: dict) -> dict:
    """best.pt when the EMA's weights are the best (trainer.select): "model" holds them (what the test
    split, the visualizations and task=ensemble use), "raw_model" the trained weights (what a resume
    from this file continues training), "weights" says which is which."""
    return {**checkpoint, "model": state.ema.state_dict()["model"], "raw_model": checkpoint["model"], "weights": "ema"}


def train_one_epoch(state: TrainState, desc: str):
    """One pass over the training data, from batch state.batch on (a mid-epoch resume): (mean loss,
    accuracy), or None when a stop signal came (state holds the position reached). The per-step losses
    and lr go to TensorBoard every trainer.log_every steps (one host sync each time), where the loss
    guard also looks at them (TrainingDiverged; several processes: _flush). trainer.checkpoint_every_steps:
    step-<step>.pt. The mean loss and accuracy are over the epoch's images of every process."""
    cfg, model = state.cfg, state.model
    model.train()
    mix = BatchMix(cfg.aug)  # aug.mixup/cutmix_alpha
    if state.mix_gen is None:  # the epoch's generator, from its first step (a mid-epoch resume restores it)
        state.mix_gen = mix_generator(cfg.trainer.seed, state.step - state.batch)
    mix_gen = state.mix_gen
    pending = Pending(state.step, with_reg=bool(state.regularizer))
    if state.totals is None:
        state.totals = (torch.zeros((), device=state.device), torch.zeros((), device=state.device, dtype=torch.long), 0)
    total_loss, correct, seen = state.totals
    every = cfg.trainer.checkpoint_every_steps
    show_bar = cfg.trainer.progress and sys.stderr.isatty() and state.world.rank == 0
    batches = iter(state.train_loader)
    for _ in range(state.batch):  # replay the loader's draws (order, augmentation) up to the resume point
        next(batches)
    with tqdm(total=len(state.train_loader), initial=state.batch, desc=desc, disable=not show_bar, leave=False,
              unit="batch") as bar:
        for i, (x, y) in enumerate(batches, start=state.batch):
            if state.stop_signal is not None:  # between steps: the position and totals so far are in state
                _flush(state, pending, final=True)
                return None
            lr = state.optimizer.param_groups[0]["lr"]
            # a measured step runs uncompiled (through DDP in several processes): the activation hooks see every layer
            net = state.wrapped if state.monitor.measures(state.step) else state.net
            out = training_step(net, x, y, state.loss_fn, state.optimizer, state.regularizer,
                                mix=(lambda x, y: mix(x, y, mix_gen)) if mix else None,
                                monitor=state.monitor, step=state.step, speed=state.speed)
            if state.lookahead:
                state.lookahead.after_step(model, state.step + 1)
            if state.ema:
                state.ema.update()
            state.scheduler.step_batch()
            pending.add(out, lr)
            total_loss += out.loss * len(out.labels)
            correct += (out.scores.argmax(1) == out.labels).sum()
            seen += len(out.labels)
            state.step += 1
            state.batch, state.totals = i + 1, (total_loss, correct, seen)
            bar.update()
            final = i == len(state.train_loader) - 1 or (every > 0 and state.step % every == 0)
            if len(pending) >= cfg.trainer.log_every or final:
                bar.set_postfix(loss=f"{_flush(state, pending, final):.4f}")
            if every > 0 and state.step % every == 0:
                save_step_checkpoint(state)
    if state.stop_signal is not None and state.batch < len(state.train_loader):  # not reached: the loop checks
        return None
    total_loss, correct, seen = _all_totals(state)
    return total_loss.item() / seen, correct.item() / seen


def _flush(state: TrainState, pending: "Pending", final: bool = False) -> float:
    """pending.flush; with several processes, then one all_reduce (max) of a [diverged, signal] flag, so
    every process stops at this same step: all raise TrainingDiverged when the loss guard of one did,
    all stop (state.stop_signal) when one received SIGINT / SIGTERM. Returns the last loss written."""
    if state.world.size == 1:
        return pending.flush(state.logger, state.monitor, state.step, final)
    diverged = None
    try:
        pending.flush(state.logger, state.monitor, state.step, final)
    except TrainingDiverged as err:
        diverged = err
    flags = distributed.all_reduce_max(torch.tensor([float(diverged is not None), float(state.signal_received or 0)]))
    if flags[0] and diverged is None:
        diverged = TrainingDiverged(f"the loss diverged in another process by step {state.step}; lower optim.lr "
                                    "and try again")
    if diverged is not None:
        raise diverged
    if flags[1]:
        state.stop_signal = int(flags[1])
    return pending.last_loss


def _all_totals(state: TrainState) -> tuple:
    """The epoch's (loss sum, correct, seen) so far, added up over the processes (one all_reduce; every
    process calls it at the same step); in one process, state.totals as they are."""
    loss, correct, seen = state.totals
    if state.world.size == 1:
        return loss, correct, seen
    sums = distributed.all_reduce_sum(torch.stack([loss.double(), correct.double(),
                                                   torch.tensor(seen, dtype=torch.float64, device=loss.device)]))
    return sums[0].to(loss.dtype), sums[1].to(correct.dtype), int(sums[2].item())


def save_step_checkpoint(state: TrainState) -> None:
    """checkpoints/step-<step>.pt, keeping the newest trainer.keep_checkpoints of them. Every process
    calls it (the epoch's totals are added up); rank 0 writes."""
    folder = state.run_dir / "checkpoints"
    checkpoint = checkpoint_state(state)
    if state.world.rank > 0:
        return
    save_checkpoint(folder / f"step-{state.step}.pt", checkpoint)
    steps = sorted((int(p.stem.removeprefix("step-")), p) for p in folder.glob("step-*.pt")
                   if p.stem.removeprefix("step-").isdigit())
    for _, old in steps[:-max(1, state.cfg.trainer.keep_checkpoints)]:
        old.unlink(missing_ok=True)


class Pending:
    """Per-step values (losses, lr) held on the device between flushes to TensorBoard. A flush starts
    their copy to the host and writes the previous flush's values (monitor.Deferred: on CUDA the loop
    never waits for the GPU; the loss guard then sees a loss up to 2 x trainer.log_every steps late);
    flush(final=True), at the end of an epoch, before a checkpoint and on a stop, writes everything."""

    TENSORS = ("train/loss", "train/data_loss", "train/reg_loss")

    def __init__(self, first_step: int, with_reg: bool):
        self.first, self.with_reg = first_step, with_reg
        self.values = {tag: [] for tag in (*self.TENSORS, "opt/lr", "opt/lr_log10")}
        self.on_the_way = Deferred()
        self.last_loss = math.nan

    def __len__(self) -> int:
        return len(self.values["opt/lr"])

    def add(self, step, lr: float) -> None:
        self.values["train/loss"].append(step.loss)
        if self.with_reg:
            self.values["train/data_loss"].append(step.data_loss)
            self.values["train/reg_loss"].append(step.reg_loss)
        self.values["opt/lr"].append(lr)
        self.values["opt/lr_log10"].append(math.log10(lr) if lr > 0 else None)  # comparable across optimizers

    def flush(self, logger: RunLogger, monitor: TrainingMonitor, next_step: int, final: bool = False) -> float:
        """Send the values since the last flush on their way, write those that arrived (the loss guard
        checks their losses first: TrainingDiverged). Returns the last loss written."""
        if len(self):
            tags = [tag for tag in self.TENSORS if self.values[tag]]
            stacked = torch.stack([torch.stack(self.values[tag]).float() for tag in tags])
            floats = {tag: values for tag, values in self.values.items() if tag.startswith("opt/")}
            self.on_the_way.put(stacked, (tags, floats, self.first))
        self.first = next_step
        self.values = {tag: [] for tag in self.values}
        for rows, (tags, floats, first) in self.on_the_way.take(keep=0 if final else 1):
            monitor.check_losses(rows[0], first)
            for tag, values in [*zip(tags, rows), *floats.items()]:
                logger.series(tag, values, first)
            self.last_loss = rows[0][-1]
        return self.last_loss


def checkpoint_state(state: TrainState) -> dict:
    """The checkpoint of the run as it is now: a plain dict (see cvtrain/checkpoint.py). The plain model's
    weights (no DDP or compile prefixes) and the number of processes: it resumes in any number. Mid-epoch
    with several processes every process calls it at the same step: the totals of all are added up."""
    data = state.data
    totals = _all_totals(state) if state.batch else None
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "epoch": state.epoch, "step": state.step,
            "best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch, "rng": rng_state(),
            # the position inside epoch `epoch` (0 batches at an epoch's end): a resume continues there exactly
            "batch": state.batch,
            "epoch_totals": None if not state.batch else
            {"loss": totals[0].detach().clone(), "correct": totals[1].detach().clone(), "seen": totals[2]},
            "world_size": state.world.size,
            "mix_rng": state.mix_gen.get_state() if state.batch and state.mix_gen is not None else None,
            "initial_loss": state.monitor.loss_guard.initial if state.monitor else None,
            "scaler": state.speed.scaler.state_dict() if state.speed.scaler else None,  # precision=16
            "lookahead": state.lookahead.state_dict() if state.lookahead else None,
            **({"ema": state.ema.state_dict(), "best_ema_val_acc": state.best_ema_val_acc,  # trainer.ema
                "best_weights": state.best_weights} if state.ema else {}),
            "config": OmegaConf.to_container(state.cfg, resolve=True),
            "data": {"mean": data.mean, "std": data.std, "preprocess": data.preprocess.state_dict(),
                     "classes": list(data.classes), "shape": list(data.shape)}}


def finish(state: TrainState) -> dict:
    """After the last epoch: the test split and the visualizations (of the best checkpoint's
    weights), then summary.json. Returns the summary. Several processes: rank 0 does all of it alone
    (the whole test split, no collective), the others only return the summary."""
    cfg = state.cfg
    summary = {"status": "completed", "best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch,
               "final_val_acc": state.val_acc, "epochs": state.epoch,
               "train_time_s": round(time.perf_counter() - state.started, 3),
               "train_images_per_s": round(state.train_images / max(state.train_time, 1e-9), 1),
               "params": state.params, "device": str(state.device), "precision": _precision(state.speed),
               "world_size": state.world.size, "global_batch_size": cfg.data.batch_size * state.world.size,
               **({"compile_time_s": round(state.compile_time_s, 3)} if state.speed.compile else {}),
               **({"ema_decay": state.ema.decay, "select": cfg.trainer.select, "best_weights": state.best_weights,
                   "final_ema_val_acc": state.ema_val_acc, "best_ema_val_acc": state.best_ema_val_acc}
                  if state.ema else {}),
               **({"snapshots": sorted(state.snapshots.values())} if state.snapshots else {}),
               **state.monitor.summary()}
    if state.world.rank > 0:
        return summary
    weights = _load_best(state) if cfg.trainer.test or cfg.trainer.viz else "final"
    if cfg.trainer.test:
        loader = InMemoryLoader(state.data.test, cfg.data.eval_batch_size, device=state.device,
                                preprocess=state.data.preprocess, placement=cfg.data.placement)
        test_loss, summary["test_acc"] = evaluate(state.eval_net, loader, state.loss_fn, state.speed, cfg.trainer.tta)
        log.info("test (%s model): loss %.4f acc %.2f%% on %d images", weights, test_loss,
                 100 * summary["test_acc"], len(state.data.test))
    if cfg.trainer.viz:
        _visualize(state, weights)
    state.logger.summary(summary, state.step)
    write_summary(state.run_dir, summary)
    log.info("done: best val acc %.2f%% (epoch %d)%s | %.1f s, %.0f train images/s | %s",
             100 * state.best_val_acc, state.best_epoch,
             f" | test acc {100 * summary['test_acc']:.2f}%" if "test_acc" in summary else "",
             summary["train_time_s"], summary["train_images_per_s"], state.run_dir)
    return summary


class StopRun(Exception):
    """Raised by TrainState.on_epoch to end a run after an epoch (task=search's pruner: status "pruned")."""

    def __init__(self, reason: str, status: str = "stopped"):
        super().__init__(reason)
        self.status = status


def train(cfg, run_dir: Path, on_epoch=None) -> dict:
    """setup -> fit -> finish; returns the summary. A diverged run (TrainingDiverged) keeps its last
    good checkpoint and writes a summary.json with status "diverged" before the error goes on; so does a
    run that `on_epoch` (TrainState.on_epoch) stopped with StopRun, with the StopRun's status."""
    state = setup(cfg, run_dir)
    state.on_epoch = on_epoch
    try:
        fit(state)
        return finish(state)
    except (TrainingDiverged, StopRun) as err:
        summary = {"status": getattr(err, "status", "diverged"), "reason": str(err), "epochs": state.epoch,
                   "best_val_acc": state.best_val_acc if state.best_epoch else None, "best_epoch": state.best_epoch,
                   "params": state.params, "device": str(state.device), **state.monitor.summary()}
        state.logger.summary(summary, state.step)
        if state.world.rank == 0:
            write_summary(state.run_dir, summary)
        raise
    except Interrupted as err:
        command = resume_command(state.run_dir)
        if state.world.size > 1:  # (a checkpoint resumes in any number of processes, python -m cvtrain too)
            torchrun = f"torchrun --nproc_per_node={state.world.size} -m cvtrain"
            command = command.replace("python -m cvtrain", torchrun, 1)
        summary = {"status": "interrupted", "reason": str(err), "step": state.step, "epochs": state.epoch,
                   "batch": state.batch, "best_val_acc": state.best_val_acc if state.best_epoch else None,
                   "best_epoch": state.best_epoch, "params": state.params, "device": str(state.device),
                   "resume_command": command, **state.monitor.summary()}
        state.logger.summary(summary, state.step)
        if state.world.rank == 0:
            write_summary(state.run_dir, summary)
        log.warning("%s; checkpoint %s. Resume with:\n%s", err, state.run_dir / "checkpoints" / "last.pt", command)
        raise
    finally:
        _restore_stop_handlers(state)
        state.logger.close()


# --- SIGINT / SIGTERM: a stop flag checked between steps -------------------------------------------

def _install_stop_handlers(state: TrainState) -> None:
    """The first SIGINT (Ctrl-C) or SIGTERM sets state.stop_signal: the loop stops after the current step
    with a checkpoint; a second one stops at once (Interrupted from the handler). Main thread only.
    Several processes: it sets state.signal_received, and every process stops at the next loss flush
    (_flush), at the same step. A repeated signal changes nothing there: torchrun passes a Ctrl-C on to
    every process (which so gets it twice) and kills them 30 s after its own first signal."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        if state.world.size > 1:
            if state.signal_received is None:
                state.signal_received = signum
                log.warning("%s: every process stops at the next loss flush (at most trainer.log_every=%d steps) "
                            "with a checkpoint", signal.Signals(signum).name, state.cfg.trainer.log_every)
            return
        if state.stop_signal is not None:
            raise Interrupted(signum, f"stopped at once by a second {signal.Signals(signum).name} at step {state.step}")
        state.stop_signal = signum
        log.warning("%s: stopping after the current step with a checkpoint (again: stop at once)",
                    signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM):
        state.handlers[signum] = signal.signal(signum, handler)


def _restore_stop_handlers(state: TrainState) -> None:
    for signum, previous in state.handlers.items():
        signal.signal(signum, previous)
    state.handlers = {}


def run(cfg, run_dir: Path) -> float:
    """The task function: train (or fit) and return the best validation accuracy."""
    if model_kind(cfg.model.name) == "fitted":
        if distributed.world_size() > 1:
            raise UserError(f"model={cfg.model.name} is fitted, not trained: it runs in one process; start it "
                            "without torchrun")
        return knn.run(cfg, run_dir)
    return train(cfg, run_dir)["best_val_acc"]


def _restore(state: TrainState, saved: dict) -> None:
    """trainer.resume: the saved model, optimizer state, schedule position, counters and RNG state."""
    cfg = state.cfg
    for group in ("model", "optim"):
        before, now = saved["config"][group], OmegaConf.to_container(cfg[group], resolve=True)
        if before.get("name") != now.get("name") or (group == "model" and before != now):
            raise UserError(f"trainer.resume: the checkpoint was trained with {group} {before}, but this run "
                            f"asks for {now}; resume with the same {group} settings")
    saved_classes, classes = list(saved["data"]["classes"]), list(state.data.classes)
    if saved_classes != classes:
        only_saved = [c for c in saved_classes if c not in classes][:5]
        only_now = [c for c in classes if c not in saved_classes][:5]
        raise UserError(f"trainer.resume: the checkpoint was trained on other classes ({len(saved_classes)}: only "
                        f"there {only_saved or '-'}; {len(classes)} in data={cfg.data.name}: only here {only_now or '-'}"
                        f"{'; same names, another order' if not only_saved and not only_now else ''}); resume on "
                        "the data it was trained on")
    try:
        state.model.load_state_dict(saved.get("raw_model", saved["model"]))  # best.pt of trainer.select=ema: both
    except RuntimeError as err:
        raise UserError(f"trainer.resume: the checkpoint's weights do not fit this model on this data "
                        f"(trained on images {saved['data']['shape']}): {str(err).splitlines()[-1].strip()}") from None
    # the optimizer's state (momentum, Adam moments) comes back; its settings (lr, betas, ...) are this run's
    optimizer = state.optimizer
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except ValueError as err:  # e.g. another optim.decay_norm_and_bias: other parameter groups
        raise UserError(f"trainer.resume: the checkpoint's optimizer state does not fit this optimizer ({err}); "
                        "resume with the same optim settings") from None
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    state.batch = saved.get("batch", 0)  # a mid-epoch checkpoint: continue at that batch of the epoch
    saved_world, world = saved.get("world_size", 1), state.world.size
    scheduler = saved["scheduler"]
    if saved_world != world:  # another number of processes: other batches per epoch (module doc)
        batch = state.batch * saved_world // world
        if state.batch:
            log.info("trainer.resume: the checkpoint stopped at batch %d of epoch %d in %d process(es); in %d that "
                     "is batch %d, which covers the same images of the epoch (at the same data.batch_size; rounded "
                     "down)", state.batch, saved["epoch"] + 1, saved_world, world, batch)
        state.batch = batch
        if "steps" in scheduler:  # the schedule goes on at the same fraction of the run
            scheduler = {**scheduler, "steps": saved["epoch"] * len(state.train_loader) + batch}
    # continue at the saved step and epoch (and plateau state), on this run's schedule shape:
    # its optim.lr, and a longer trainer.epochs stretches it
    state.scheduler.load_state_dict(scheduler)
    set_rng_state(saved["rng"])
    if state.speed.scaler is not None and saved.get("scaler"):
        state.speed.scaler.load_state_dict(saved["scaler"])
    if state.lookahead is not None and saved.get("lookahead"):
        state.lookahead.load_state_dict(saved["lookahead"])
    if state.ema is not None:  # trainer.ema: the average continues exactly, or starts at the restored weights
        if saved.get("ema"):
            state.ema.load_state_dict(saved["ema"])
        else:
            state.ema.reset()
            log.info("trainer.ema=%g: the checkpoint holds no moving average; it starts from the resumed weights",
                     state.ema.decay)
        state.best_ema_val_acc = saved.get("best_ema_val_acc", -1.0)
        state.best_weights = saved.get("best_weights", "raw")
    state.epoch, state.step = saved["epoch"], saved["step"]
    state.best_val_acc, state.best_epoch = saved["best_val_acc"], saved["best_epoch"]
    if state.batch:
        if state.batch > len(state.train_loader):
            raise UserError(f"trainer.resume: the checkpoint stopped at batch {state.batch} of an epoch, but this run's "
                            f"epochs have {len(state.train_loader)} batches; resume with the same data settings")
        totals = saved["epoch_totals"]  # of every process: rank 0 carries them on, the others start from 0
        if state.world.rank == 0:
            state.totals = (totals["loss"].to(state.device), totals["correct"].to(state.device), totals["seen"])
        if saved.get("mix_rng") is not None:
            state.mix_gen = torch.Generator()
            state.mix_gen.set_state(saved["mix_rng"])
    if state.world.rank == 0:
        _carry_best_checkpoint(Path(cfg.trainer.resume), state.run_dir)
    log.info("resumed from %s at epoch %d%s (step %d)", cfg.trainer.resume, state.epoch,
             f", batch {state.batch}" if state.batch else "", state.step)


def _process_device(device: torch.device, world: distributed.World) -> torch.device:
    """This process's device: `device` in one process; in several, cuda:<LOCAL_RANK> for a CUDA device
    (one GPU per process), the CPU as it is."""
    if world.size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(f"trainer.device={device} with {world.size} processes: each process trains on its own GPU, "
                        "cuda:<LOCAL_RANK>; use trainer.device=cuda (or auto)")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise UserError(f"process {world.rank} (LOCAL_RANK {world.local_rank}) has no GPU of its own: this machine "
                        f"has {count}; start at most {count} processes per machine (torchrun --nproc_per_node), or "
                        "use trainer.device=cpu")
    return torch.device("cuda", world.local_rank)


def _distribute(state: TrainState) -> None:
    """Several processes: the model in DistributedDataParallel (state.net, state.wrapped; compiled with
    trainer.compile), evaluation on the plain model (module doc); each process other than rank 0 draws
    its own random numbers in the forward pass (dropout) from here on. One process: state.wrapped is
    the model, state.eval_net what the loop calls."""
    state.wrapped, state.eval_net = state.model, state.net
    world = state.world
    if world.size == 1:
        return
    device_ids = [state.device.index] if state.device.type == "cuda" else None
    state.wrapped = DistributedDataParallel(state.model, device_ids=device_ids)  # rank 0's weights to every process
    state.net = torch.compile(state.wrapped, mode=state.speed.compile_mode) if state.speed.compile else state.wrapped
    state.eval_net = state.model
    if world.rank > 0:
        torch.manual_seed(epoch_seed(state.cfg.trainer.seed, state.step) * 1000 + world.rank)


def _init_images(data, device, count: int = 5000) -> torch.Tensor:
    """The first `count` training images, preprocessed as the loop feeds them: what a model's
    data-dependent init (init_from_data) sees."""
    return data.preprocess.to(device)(data.train.images[:count].to(device).float().div_(255))


def _precision(speed: Speed) -> str:
    """The precision the run really used (trainer.precision, after the device's notes)."""
    return {None: "32", torch.bfloat16: "bf16", torch.float16: "16"}[speed.amp_dtype]


def _carry_best_checkpoint(resume_path: Path, run_dir: Path) -> None:
    """A resumed run dir starts with the best checkpoint so far (and the snapshots, trainer.keep_snapshots),
    so it is complete on its own."""
    for best in [resume_path.parent / "best.pt", *sorted(resume_path.parent.glob("snapshot-*.pt"))]:
        if best.is_file() and best.resolve() != (run_dir / "checkpoints" / best.name).resolve():
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copy2(best, run_dir / "checkpoints" / best.name)


def _load_best(state: TrainState) -> str:
    """Put the best checkpoint's weights into the model (once, for the test split and the
    visualizations); returns which weights it now holds: "best", or "final" without checkpoints."""
    best = state.run_dir / "checkpoints" / "best.pt"
    if not (state.cfg.trainer.checkpoint and best.exists()):
        if state.ema is not None and state.best_weights == "ema":  # trainer.select chose the moving average
            state.model.load_state_dict(state.ema.module.state_dict())
            return "final EMA"
        return "final"
    saved = load_checkpoint(best, map_location=state.device)
    state.model.load_state_dict(saved["model"])
    return "best EMA" if saved.get("weights") == "ema" else "best"


def _visualize(state: TrainState, weights: str) -> None:
    """trainer.viz: filters or templates, confusion matrix, misclassified images and the projector
    (cvtrain/viz.py) to TensorBoard and <run dir>/viz/, drawn from the model as it is (`weights`).
    A failure here is logged, not raised: the training run itself is complete."""
    try:
        from cvtrain.viz import write_visualizations  # imports matplotlib: only when used

        val_loader = state.val_loader
        if state.world.size > 1:  # this process's loader holds its part of the split: the whole one
            val_loader = InMemoryLoader(state.data.val, state.cfg.data.eval_batch_size, device=state.device,
                                        preprocess=state.data.preprocess, placement=state.cfg.data.placement)
        files = write_visualizations(state.model, val_loader, state.data, state.logger.writer,
                                     state.run_dir, state.step)
        log.info("visualizations of the %s model: %s in %s", weights, ", ".join(files), state.run_dir / "viz")
    except Exception as err:  # noqa: BLE001
        log.warning("visualizations failed (trainer.viz=false skips them): %s", err, exc_info=True)
