"""The trainer's speed options, resolved once per run for its device (trainer.precision, channels_last,
compile, compile_mode, cudnn_benchmark, tf32). Every option is accepted on every device: where one
does not apply or does not help, it is ignored with a one-line note in the log.

    precision=32     float32 everywhere
    precision=bf16   forward and loss under torch.autocast(bfloat16); CUDA (bf16-capable GPUs) and CPU
    precision=16     autocast(float16) + a gradient scaler (its state is in checkpoints); CUDA only
                     (the CPU has no fast float16 kernels: ignored there, training in float32)
    channels_last    the model and every 4-D input batch in NHWC memory layout (faster convolutions
                     on tensor cores; applied on the CPU too, where oneDNN reads it)
    compile          torch.compile(model, mode=compile_mode); the compile time is measured on its own
                     (warm_up) and reported as compile_time_s, apart from the training time
    cudnn_benchmark  cuDNN picks the fastest convolution algorithm per input shape (CUDA)
    tf32             float32 matrix products in TF32 on Ampere and newer GPUs (CUDA)

The loss and the metrics are always computed in float32: the scores leave autocast and are cast up
(loop.training_step, loop.evaluate), and the optimizer holds float32 weights, so the update/weight
ratios and gradient norms read the real (unscaled: the scaler unscales before they are measured)
values.
"""
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from cvtrain import UserError
from cvtrain.loop import training_step

log = logging.getLogger("cvtrain")

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Speed:
    """What the loop needs to know of the speed options: autocast dtype, scaler, layout."""
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None  # None: float32
    scaler: Optional[torch.amp.GradScaler] = None  # precision=16 on CUDA
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"

    def autocast(self):
        """The context of the forward pass: autocast to amp_dtype, or nothing."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch in the model's memory layout (channels_last for 4-D batches)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put `model` in the layout (in place) and return what the loop calls for the forward pass:
        torch.compile(model) with trainer.compile, the model itself otherwise. Checkpoints, monitors
        and visualizations keep using `model` (its state_dict has no compile prefixes)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            return torch.compile(model, mode=self.compile_mode)
        return model


def check_speed(trainer_cfg) -> None:
    """Bad values of the speed options, before any work starts."""
    precision = str(trainer_cfg.precision)
    if precision not in PRECISIONS:
        raise UserError(f"trainer.precision={precision} is unknown; choose one of {' | '.join(PRECISIONS)} "
                        "(32: float32, bf16: bfloat16 autocast, 16: float16 autocast with a gradient scaler)")
    if trainer_cfg.compile_mode not in COMPILE_MODES:
        raise UserError(f"trainer.compile_mode={trainer_cfg.compile_mode} is unknown; choose one of "
                        f"{', '.join(COMPILE_MODES)}")


def resolve_speed(trainer_cfg, device: torch.device) -> Speed:
    """The Speed of this run on `device`, with a one-line note for every option it ignores; sets the
    process-wide cuDNN and TF32 switches."""
    check_speed(trainer_cfg)
    precision = str(trainer_cfg.precision)
    cuda = device.type == "cuda"
    amp_dtype = PRECISIONS[precision]
    if precision == "16" and not cuda:
        log.info("note: trainer.precision=16 is ignored on the CPU (no fast float16 kernels there); training in "
                 "float32 (trainer.precision=bf16 is the CPU's reduced precision)")
        amp_dtype = None
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        log.info("note: trainer.precision=bf16 is ignored: this GPU has no bfloat16; use trainer.precision=16")
        amp_dtype = None
    if not cuda and trainer_cfg.tf32:
        log.info("note: trainer.tf32 acts on CUDA only (TF32 matrix products); ignored on the CPU")
    if cuda:
        torch.backends.cudnn.benchmark = bool(trainer_cfg.cudnn_benchmark)
        torch.backends.cuda.matmul.allow_tf32 = bool(trainer_cfg.tf32)
        torch.backends.cudnn.allow_tf32 = True  # cuDNN's own default for convolutions
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    return Speed(device, amp_dtype, scaler, bool(trainer_cfg.channels_last), bool(trainer_cfg.compile),
                 trainer_cfg.compile_mode)


def warm_up(net, model: nn.Module, speed: Speed, loss_fn, train_batch: tuple, eval_batch: torch.Tensor) -> float:
    """Compile `net` (torch.compile) before the clock of training starts: a training step with a
    learning rate of 0 on `train_batch` (images, labels) and an eval-mode forward on `eval_batch`,
    leaving the model's parameters and buffers (batch norm's running statistics) as they were.
    Returns the seconds it took (compile_time_s); 0.0 when the model is not compiled."""
    if not speed.compile:
        return 0.0
    start = time.perf_counter()
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    training_step(net, *train_batch, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0), speed=speed)
    model.eval()
    with torch.inference_mode(), speed.autocast():
        net(speed.layout(eval_batch))
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    model.train(was_training)
    if speed.device.type == "cuda":
        torch.cuda.synchronize(speed.device)
    return time.perf_counter() - start
