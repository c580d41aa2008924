"""The experiment presets: each composes with any CIFAR-10 source, builds, cites its source's figure,
and the ResNet presets follow He et al.'s iteration schedule."""
from pathlib import Path

import pytest

from cvtrain.models import build_model
from cvtrain.optim import build_optimizer, build_scheduler

PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "experiment").glob("*.yaml"))
CIFAR = [p for p in PRESETS if p.startswith("cifar10_")]
STEPS_PER_EPOCH = 45_000 // 128  # the 45,000 training images of the 45k/5k split, full batches


def test_the_presets_are_found():
    assert {"cifar10_resnet20", "cifar10_resnet56", "cifar10_resnet110", "cifar10_vgg16_bn", "cifar10_nin",
            "cifar10_lenet", "cifar10_mlp"} <= set(CIFAR)


@pytest.mark.parametrize("preset", CIFAR)
@pytest.mark.parametrize("source", [["data=cifar10", "data.root=/somewhere"], ["data=imagefolder", "data.root=/x"]])
def test_a_cifar_preset_takes_any_cifar_source_and_builds(compose_config, preset, source):
    cfg = compose_config([f"experiment={preset}", *source])
    assert cfg.data.name == source[0].removeprefix("data=")  # the preset does not fix the data
    model = build_model(cfg.model, (3, 32, 32), 10)
    optimizer = build_optimizer(cfg.optim, model)
    build_scheduler(cfg.sched, optimizer, cfg.trainer.epochs, STEPS_PER_EPOCH)
    assert compose_config([f"experiment={preset}", *source, "trainer.epochs=2"]).trainer.epochs == 2


@pytest.mark.parametrize("preset", CIFAR)
def test_a_preset_cites_its_figure(preset):
    text = (Path(__file__).parents[1] / "configs" / "experiment" / f"{preset}.yaml").read_text()
    assert "%" in text and any(word in text for word in ("Paper", "Reference figure", "Measured", "README"))


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_the_resnet_presets_follow_the_paper_schedule(compose_config, depth):
    cfg = compose_config([f"experiment=cifar10_resnet{depth}", "data=imagefolder", "data.root=/x"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.data.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert cfg.aug.crop_padding == 4 and cfg.aug.hflip
    assert abs(cfg.trainer.epochs * STEPS_PER_EPOCH - 64_000) < STEPS_PER_EPOCH  # 64k iterations
    model = build_model(cfg.model, (3, 32, 32), 10)
    optimizer = build_optimizer(cfg.optim, model)
    schedule = build_scheduler(cfg.sched, optimizer, cfg.trainer.epochs, STEPS_PER_EPOCH)
    lrs = []
    for _ in range(cfg.trainer.epochs * STEPS_PER_EPOCH):
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step_batch()
    drops = [i for i in range(1, len(lrs)) if lrs[i] < 0.5 * lrs[i - 1]]
    assert len(drops) == 2 and all(abs(d - it) <= 400 for d, it in zip(drops, (32_000, 48_000))), drops
    assert lrs[-1] == pytest.approx(0.001)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(
        {20: 0.27e6, 56: 0.85e6, 110: 1.7e6}[depth], rel=0.03)
