"""The speed options (trainer.precision / channels_last / compile / tta / lookahead, data.placement):
each trains on the CPU, or is ignored there with a note; the CUDA paths are covered by tests that
skip without CUDA."""
import json
import logging

import pytest
import torch
import torch.nn as nn

from cvtrain import UserError
from cvtrain.checkpoint import load_checkpoint
from cvtrain.data import InMemoryLoader, Split
from cvtrain.loop import Lookahead, evaluate, tta_views
from cvtrain.monitor import Deferred
from cvtrain.speed import resolve_speed
from cvtrain.tasks.train import train

TINY = ["data=synthetic", "data.num_samples=512", "data.image_size=16", "data.num_classes=4", "trainer.viz=false",
        "trainer.epochs=2", "model=lenet", "optim=adam"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _train(compose_config, tmp_path, *overrides):
    cfg = compose_config([*TINY, *overrides])
    summary = train(cfg, tmp_path)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    return summary


def test_bf16_trains_on_the_cpu_and_the_loss_stays_float32(compose_config, tmp_path):
    summary = _train(compose_config, tmp_path, "trainer.precision=bf16")
    assert summary["precision"] == "bf16"
    assert summary["best_val_acc"] > 0.5  # 4 learnable classes: chance is 0.25
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert -5 < summary["update_ratio_log10"] < -1  # the monitors read the float32 master weights


def test_float16_on_the_cpu_is_ignored_with_a_note(compose_config, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cvtrain"):
        summary = _train(compose_config, tmp_path, "trainer.precision=16", "trainer.epochs=1")
    assert summary["precision"] == "32"
    assert any("trainer.precision=16 is ignored on the CPU" in r.message for r in caplog.records)


@pytest.mark.parametrize("override, message", [
    ("trainer.precision=fp8", "trainer.precision=fp8 is unknown; choose one of 32 | bf16 | 16"),
    ("trainer.compile_mode=fast", "trainer.compile_mode=fast is unknown"),
    ("trainer.tta=rotate", "trainer.tta=rotate is unknown; choose one of none, flip, flip_translate"),
    ("trainer.lookahead_alpha=0", "trainer.lookahead_alpha=0.0 in (0, 1]"),
    ("data.placement=gpu", "data.placement=gpu is unknown; choose one of auto, device, host"),
])
def test_a_bad_speed_option_is_an_error_before_any_work(compose_config, tmp_path, override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        train(compose_config([*TINY, override]), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_channels_last_trains_and_checkpoints_load_into_a_plain_model(compose_config, tmp_path):
    cfg = compose_config([*TINY, "trainer.channels_last=true", "trainer.epochs=1"])
    speed = resolve_speed(cfg.trainer, torch.device("cpu"))
    conv = speed.prepare(nn.Sequential(nn.Conv2d(3, 8, 3)))
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert speed.layout(torch.zeros(2, 3, 5, 5)).is_contiguous(memory_format=torch.channels_last)
    assert speed.layout(torch.zeros(2, 7)).shape == (2, 7)  # not an image batch: as is
    summary = train(cfg, tmp_path)
    assert summary["best_val_acc"] > 0.4
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert not any(k.startswith("_orig_mod") for k in saved)


def test_compile_trains_lenet_as_the_eager_model_does_and_reports_its_compile_time_apart(compose_config, tmp_path):
    compiled = _train(compose_config, tmp_path / "compiled", "trainer.compile=true", "trainer.epochs=1")
    eager = _train(compose_config, tmp_path / "eager", "trainer.epochs=1")
    assert compiled["compile_time_s"] > 0 and "compile_time_s" not in eager
    # the same steps on the same batches: the same model, up to float rounding in fused kernels
    assert compiled["best_val_acc"] == pytest.approx(eager["best_val_acc"], abs=0.02)
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("compiled", "eager")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    saved = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.pt")["model"]
    assert saved and not any("_orig_mod" in k for k in saved)  # the plain module's weights


def test_tta_views_are_weighted_to_one_and_a_mirror_symmetric_model_is_unchanged():
    x = torch.rand(3, 3, 8, 8)
    for tta in ("none", "flip", "flip_translate"):
        assert sum(w for w, _ in tta_views(x, tta)) == pytest.approx(1.0)
    assert len(tta_views(x, "flip_translate")) == 6
    up_left = tta_views(x, "flip_translate")[2][1]
    assert torch.equal(up_left[..., 1:, 1:], x[..., :-1, :-1])  # shifted by one pixel, right and down edges kept

    class MeanColor(nn.Module):  # scores = mean of each channel: invariant under flips
        def forward(self, x):
            return x.mean(dim=(2, 3))

    images = (torch.rand(20, 3, 8, 8) * 255).to(torch.uint8)
    loader = InMemoryLoader(Split(images, torch.randint(0, 3, (20,))), 7, mean=torch.zeros(3), std=torch.ones(3))
    plain = evaluate(MeanColor(), loader, nn.CrossEntropyLoss())
    assert evaluate(MeanColor(), loader, nn.CrossEntropyLoss(), tta="flip") == pytest.approx(plain)


def test_lookahead_moves_the_slow_weights_a_fraction_toward_the_fast_ones():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    look = Lookahead(model, every=2, alpha=0.5, total_steps=4)
    with torch.no_grad():
        model.weight.fill_(1.0)
    look.after_step(model, 1)  # not a multiple of `every`: nothing
    assert torch.equal(model.weight, torch.ones(1, 2))
    look.after_step(model, 2)  # alpha = 1 - 0.5 * (2/4)^3 = 0.9375
    assert model.weight[0, 0].item() == pytest.approx(0.9375)
    with torch.no_grad():
        model.weight.fill_(2.0)
    look.after_step(model, 4)  # the last step: alpha = 0.5 -> halfway between 0.9375 and 2
    assert model.weight[0, 0].item() == pytest.approx(0.9375 + 0.5 * (2 - 0.9375))
    assert torch.equal(look.state_dict()["slow"][0], model.weight)


def test_a_run_with_lookahead_and_tta_trains_and_resumes(compose_config, tmp_path):
    first = _train(compose_config, tmp_path / "a", "trainer.lookahead_every=5", "trainer.lookahead_alpha=0.3",
                   "trainer.tta=flip", "trainer.epochs=1")
    assert first["best_val_acc"] > 0.3
    saved = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert len(saved["lookahead"]["slow"]) >= len(saved["model"]) - 5  # parameters + float buffers
    resumed = _train(compose_config, tmp_path / "b", "trainer.lookahead_every=5", "trainer.lookahead_alpha=0.3",
                     "trainer.tta=flip", f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}")
    assert resumed["epochs"] == 2


def test_host_placement_on_the_cpu_is_the_device_placement(caplog):
    images = (torch.rand(10, 1, 4, 4) * 255).to(torch.uint8)
    with caplog.at_level(logging.INFO, logger="cvtrain"):
        loader = InMemoryLoader(Split(images, torch.arange(10)), 4, mean=torch.zeros(1), std=torch.ones(1),
                                placement="host")
    assert not loader.on_host and "data.placement=host is the same as device on the CPU" in caplog.text


# --- CUDA: skipped without it -------------------------------------------------------------------

@cuda
def test_host_placement_copies_ahead_the_same_batches_as_device_placement():
    images = (torch.rand(300, 3, 8, 8) * 255).to(torch.uint8)
    split = Split(images, torch.randint(0, 10, (300,)))
    kwargs = dict(mean=torch.zeros(3), std=torch.ones(3), device=torch.device("cuda"), shuffle=True, seed=3)
    host, device = InMemoryLoader(split, 64, placement="host", **kwargs), InMemoryLoader(split, 64, **kwargs)
    assert host.on_host and host.images.is_pinned() and not device.on_host
    for (xh, yh), (xd, yd) in zip(host, device, strict=True):
        assert xh.is_cuda and torch.equal(xh, xd) and torch.equal(yh, yd)


@cuda
@pytest.mark.parametrize("precision", ["16", "bf16"])
def test_mixed_precision_on_cuda_trains_with_unscaled_monitors(compose_config, tmp_path, precision):
    summary = _train(compose_config, tmp_path, f"trainer.precision={precision}", "trainer.device=cuda",
                     "trainer.channels_last=true")
    assert summary["precision"] == precision and summary["best_val_acc"] > 0.5
    assert -5 < summary["update_ratio_log10"] < -1  # a scaled gradient would show as a huge ratio
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (saved["scaler"] is not None) == (precision == "16")


@cuda
def test_compile_on_cuda_trains(compose_config, tmp_path):
    summary = _train(compose_config, tmp_path, "trainer.compile=true", "trainer.device=cuda",
                     "trainer.precision=bf16", "trainer.channels_last=true", "trainer.epochs=1")
    assert summary["compile_time_s"] > 0 and summary["best_val_acc"] > 0.3


def test_deferred_values_on_the_cpu_are_ready_at_once():
    deferred = Deferred()
    deferred.put(torch.tensor([1.0, 2.0]), "a")
    assert list(deferred.take(keep=1)) == [([1.0, 2.0], "a")]  # nothing to wait for on the CPU
    assert list(deferred.take()) == []


@cuda
def test_deferred_values_on_cuda_arrive_a_round_later_without_a_wait():
    deferred = Deferred()
    deferred.put(torch.tensor([1.0], device="cuda"), "first")
    assert list(deferred.take(keep=1)) == []  # the newest round stays on its way
    deferred.put(torch.tensor([2.0], device="cuda"), "second")
    assert list(deferred.take(keep=1)) == [([1.0], "first")]
    assert list(deferred.take(keep=0)) == [([2.0], "second")]


def test_a_resumed_run_keeps_the_loss_guard_on_the_first_loss_of_the_run(compose_config, tmp_path):
    """After a resume late in training the guard must not take that late, low loss as its reference
    (a normal rise of the loss would then look like an explosion)."""
    _train(compose_config, tmp_path / "a", "trainer.epochs=1")
    saved = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert saved["initial_loss"] == pytest.approx(1.386, rel=0.1)  # ln 4: the first loss of the run
    cfg = compose_config([*TINY, f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}"])
    from cvtrain.tasks.train import _restore_stop_handlers, setup
    state = setup(cfg, tmp_path / "b")
    try:
        assert state.monitor.loss_guard.initial == saved["initial_loss"]
    finally:
        _restore_stop_handlers(state)
        state.logger.close()
