"""model=airbench (src/cvtrain/models/speedrun.py, airbench94's network) and optim.norm_and_bias_lr_scale
(src/cvtrain/optim.py, airbench's bias_scaler): shapes, airbench94's parameter count and init, the
data-dependent whitening (init_from_data), the frozen whitening weight, the lr-scaled param group and its
ratio through the schedules and a resume."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cvtrain import UserError
from cvtrain.models import build_model, create_model
from cvtrain.models.speedrun import AirbenchNet
from cvtrain.monitor import UpdateRatioMonitor
from cvtrain.optim import build_optimizer, build_scheduler, param_groups

AIRBENCH94_PARAMS = 1_972_792  # sum(p.numel()) of airbench 0.1.8's make_net94()
AIRBENCH94_TRAINABLE = 1_971_352  # without the whitening weights (288) and the BatchNorm weights (1152)


def airbench_model(shape=(3, 32, 32), classes=10, **options) -> AirbenchNet:
    torch.manual_seed(0)
    return build_model({"name": "airbench", **options}, shape, classes)


def correlated_images(n=64, c=3, side=32, seed=0) -> torch.Tensor:
    """Smooth images with channels mixed (strongly correlated patches, as natural images have) plus a
    little white noise, standardized per channel as data.preprocess=standardize makes them."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(n, c, side // 4, side // 4, generator=g), size=(side, side), mode="bilinear",
                           align_corners=False)
    mix = torch.eye(c) + 0.5 * torch.ones(c, c)
    x = torch.einsum("dc,nchw->ndhw", mix, smooth) + 0.2 * torch.randn(n, c, side, side, generator=g)
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


def patch_moment(x: torch.Tensor, k: int) -> np.ndarray:
    """E[p p^T] of the k x k patches (C, kh, kw order), computed independently in numpy float64."""
    a = x.double().numpy()
    n, c, h, w = a.shape
    patches = np.stack([a[:, :, i:i + h - k + 1, j:j + w - k + 1] for i in range(k) for j in range(k)], axis=2)
    patches = patches.transpose(0, 3, 4, 1, 2).reshape(-1, c * k * k)  # (positions, C * (ki, kj))
    return patches.T @ patches / len(patches)


# --- shapes, size, init ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64), (1, 28, 28), (3, 9, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_output_shape(shape):
    model = airbench_model(shape, classes=7)
    for mode in (model.train, model.eval):
        mode()
        out = model(torch.randn(4, *shape))
        assert out.shape == (4, 7) and torch.isfinite(out).all()


def test_parameter_count_is_airbench94s():
    model = airbench_model()
    assert sum(p.numel() for p in model.parameters()) == AIRBENCH94_PARAMS
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == AIRBENCH94_TRAINABLE
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(["whiten.weight", *[f"block{i}.bn{j}.weight" for i in (1, 2, 3) for j in (1, 2)]])
    assert model.whiten.weight.shape == (24, 3, 2, 2) and model.whiten.bias.requires_grad
    assert model.fc.bias is None and model.scale.factor == pytest.approx(1 / 9)


def test_native_init_is_airbenchs():
    model = airbench_model()
    for block in (model.block1, model.block2, model.block3):
        for conv in (block.conv1, block.conv2):
            identity = nn.init.dirac_(torch.empty_like(conv.weight[:conv.in_channels]))
            assert torch.equal(conv.weight[:conv.in_channels], identity)  # the first in_channels filters
        for bn in (block.bn1, block.bn2):
            assert bn.eps == 1e-12 and bn.momentum == pytest.approx(0.4)
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert model.block1.conv1.weight[24:].std() > 0  # the rest of a widening conv is PyTorch's random draw
    assert torch.equal(model.whiten.bias, torch.zeros(24))
    # before init_from_data: the whitening of an identity covariance, +-e_i / sqrt(1 + eps)
    rows = model.whiten.weight.flatten(1) * math.sqrt(1 + model.whiten_eps)
    torch.testing.assert_close(rows, torch.cat([torch.eye(12), -torch.eye(12)]))


def test_fc_keeps_pytorchs_default_init_because_the_scores_are_scaled_by_one_ninth():
    """airbench's head: PyTorch's Linear draw, U(-1/sqrt(256), 1/sqrt(256)) (rms 1/sqrt(3*256) = 0.036), not
    shrunk: the output-layer rule bounds fc x 1/9 (rms 0.1/sqrt(256) allows fc up to 0.056). An init above
    that bound (kaiming: sqrt(2/256) = 0.088) is scaled down to it."""
    torch.manual_seed(0)
    native = airbench_model().fc.weight
    assert native.abs().max() <= 1 / 16 and native.square().mean().sqrt().item() == pytest.approx(0.036, rel=0.05)
    kaiming = airbench_model(init="kaiming").fc.weight
    assert kaiming.square().mean().sqrt().item() == pytest.approx(9 * 0.1 / 16, rel=1e-4)


def test_too_small_inputs_and_bad_options_are_user_errors():
    with pytest.raises(UserError, match="needs images of at least 9x9.*model=mlp"):
        create_model("airbench", (3, 8, 8), 10)
    with pytest.raises(UserError, match="whiten_width=7"):
        create_model("airbench", (3, 32, 32), 10, whiten_width=7)
    with pytest.raises(UserError, match="whiten_width=26"):
        create_model("airbench", (3, 32, 32), 10, whiten_width=26)
    with pytest.raises(UserError, match="model.widths"):
        create_model("airbench", (3, 32, 32), 10, widths=[64, 0])
    with pytest.raises(UserError, match="model.whiten_eps"):
        create_model("airbench", (3, 32, 32), 10, whiten_eps=0.0)


def test_options_change_the_network():
    model = airbench_model(widths=[16, 32], whiten_kernel_size=3, whiten_width=10)
    assert model.whiten.weight.shape == (10, 3, 3, 3) and model.fc.in_features == 32
    assert [n for n, _ in model.named_children()] == ["whiten", "act", "block1", "block2", "pool", "flatten", "fc",
                                                      "scale"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- init_from_data: the whitening ----------------------------------------------------------------

@pytest.mark.parametrize("c,k", [(3, 2), (1, 2), (3, 3)])
def test_init_from_data_whitens_the_patches(c, k):
    x = correlated_images(c=c)
    model = airbench_model((c, 32, 32), whiten_kernel_size=k)
    model.init_from_data(x)
    moment = patch_moment(x, k)
    eigenvalues = np.linalg.eigvalsh(moment)[::-1]
    assert eigenvalues[-1] > 40 * model.whiten_eps  # every direction well above eps: the whitening is ~ identity
    z = F.conv2d(x.double(), model.whiten.weight.double())  # the whitening layer without its bias
    half = z.shape[1] // 2
    torch.testing.assert_close(z[:, half:], -z[:, :half])  # the second half: the negated filters
    flat = z[:, :half].transpose(0, 1).flatten(1)
    cov = (flat @ flat.T / flat.shape[1]).numpy()
    expected = np.diag(eigenvalues / (eigenvalues + model.whiten_eps))  # E[z z^T], largest eigenvalue first
    np.testing.assert_allclose(cov, expected, atol=1e-5)
    np.testing.assert_allclose(cov, np.eye(half), atol=0.05)


def test_init_from_data_a_narrower_whitening_keeps_the_leading_directions():
    x = correlated_images()
    full, narrow = airbench_model(), airbench_model(whiten_width=8)
    full.init_from_data(x)
    narrow.init_from_data(x)
    torch.testing.assert_close(narrow.whiten.weight[:4], full.whiten.weight[:4])
    torch.testing.assert_close(narrow.whiten.weight[4:], full.whiten.weight[12:16])


def test_init_from_data_takes_any_batch_and_is_deterministic():
    model = airbench_model()
    x = correlated_images(n=5)
    model.init_from_data(x[:1])  # one image: 31 * 31 patches
    assert torch.isfinite(model.whiten.weight).all()
    model.init_from_data(x)
    first = model.whiten.weight.clone()
    model.init_from_data(x.double())  # any float dtype; the weight keeps its own
    assert model.whiten.weight.dtype == torch.float32
    torch.testing.assert_close(model.whiten.weight, first)
    model.init_from_data(torch.zeros(2, 3, 32, 32))  # degenerate: no variance at all, eps keeps it finite
    assert torch.isfinite(model.whiten.weight).all()
    with pytest.raises(UserError, match=r"\(N, 3, H, W\)"):
        model.init_from_data(torch.randn(2, 1, 32, 32))
    with pytest.raises(UserError, match="at least"):
        model.init_from_data(torch.randn(0, 3, 32, 32))


def test_initial_loss_is_ln_classes_after_init_from_data():
    x, y = correlated_images(n=16), torch.arange(16) % 10
    model = airbench_model()
    model.init_from_data(x)
    with torch.no_grad():
        loss = F.cross_entropy(model.train()(x), y).item()
    assert loss == pytest.approx(math.log(10), rel=0.05)


# --- the optimizer: frozen whitening, norm_and_bias_lr_scale ---------------------------------------

def test_whitening_weight_stays_frozen_through_optimizer_steps(compose_config):
    x, y = correlated_images(n=16), torch.arange(16) % 10
    model = airbench_model()
    model.init_from_data(x)
    cfg = compose_config(["optim=nesterov", "++optim.norm_and_bias_lr_scale=64"])
    optimizer = build_optimizer(cfg.optim, model)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.whiten.weight) not in in_groups
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monitor = UpdateRatioMonitor(model)  # update/weight ratios: the frozen weight is not among them
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        monitor.before_step()
        optimizer.step()
        ratios = monitor.after_step()
    assert model.whiten.weight.grad is None
    assert "update_ratio/whiten.weight" not in ratios and "update_ratio/block1.conv1.weight" in ratios
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name


def test_scaled_group_holds_the_batchnorm_biases(compose_config):
    """airbench's groups: BatchNorm biases at 64x the lr; everything else, its whitening bias too, at the lr."""
    model = airbench_model()
    cfg = compose_config(["optim=nesterov", "optim.weight_decay=0.01", "++optim.norm_and_bias_lr_scale=64"])
    weights, scaled = build_optimizer(cfg.optim, model).param_groups
    bn_biases = [p for n, p in model.named_parameters() if ".bn" in n and n.endswith(".bias")]
    assert [id(p) for p in scaled["params"]] == [id(p) for p in bn_biases]
    assert id(model.whiten.bias) in {id(p) for p in weights["params"]}
    assert scaled["lr"] == pytest.approx(64 * cfg.optim.lr) and weights["lr"] == cfg.optim.lr
    assert scaled["lr"] * scaled["weight_decay"] == pytest.approx(weights["lr"] * weights["weight_decay"])
    # decay_norm_and_bias=false: the whitening bias in a no-decay group at the lr, the scaled group without decay
    cfg = compose_config(["optim=nesterov", "optim.decay_norm_and_bias=false", "++optim.norm_and_bias_lr_scale=64"])
    weights, no_decay, scaled = build_optimizer(cfg.optim, model).param_groups
    assert [id(p) for p in no_decay["params"]] == [id(model.whiten.bias)]
    assert no_decay["weight_decay"] == scaled["weight_decay"] == 0.0 and no_decay["lr"] == cfg.optim.lr
    assert scaled["lr"] == pytest.approx(64 * cfg.optim.lr)


def test_whitening_bias_trains_for_whiten_bias_epochs_then_freezes(compose_config):
    """model.whiten_bias_epochs=2: the whitening bias in a group of its own at the lr (with the decay), whose lr
    the schedule sets to 0 after 2 epochs (a resumed schedule too); the other parameters train on."""
    x, y = correlated_images(n=8), torch.arange(8) % 10
    model = airbench_model(whiten_bias_epochs=2)
    cfg = compose_config(["optim=nesterov", "optim.weight_decay=0.01", "sched=cosine",
                          "++optim.norm_and_bias_lr_scale=64"])
    optimizer = build_optimizer(cfg.optim, model)
    weights, scaled, whiten = optimizer.param_groups
    assert [id(p) for p in whiten["params"]] == [id(model.whiten.bias)] and whiten["train_for_epochs"] == 2
    assert whiten["lr"] == weights["lr"] and whiten["weight_decay"] == weights["weight_decay"] == 0.01
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=4, steps_per_epoch=2)
    moved = []
    for epoch in range(4):
        for _ in range(2):
            assert (whiten["lr"] > 0) == (epoch < 2) and weights["lr"] > 0
            before = model.whiten.bias.detach().clone(), model.block1.conv1.weight.detach().clone()
            optimizer.zero_grad()
            F.cross_entropy(model.train()(x), y).backward()
            assert model.whiten.bias.grad is not None  # still part of the graph (DDP reduces it)
            optimizer.step()
            scheduler.step_batch()
            moved.append((not torch.equal(model.whiten.bias, before[0]),
                          not torch.equal(model.block1.conv1.weight, before[1])))
        scheduler.step_epoch(1.0, 0.5)
    assert moved == [(True, True)] * 4 + [(False, True)] * 4
    resumed = build_optimizer(cfg.optim, airbench_model(whiten_bias_epochs=2))
    again = build_scheduler(cfg.sched, resumed, epochs=4, steps_per_epoch=2)
    again.load_state_dict({"steps": 5, "epochs": 2})
    assert resumed.param_groups[2]["lr"] == 0.0 and resumed.param_groups[0]["lr"] > 0
    with pytest.raises(UserError, match="model.whiten_bias_epochs=0"):
        create_model("airbench", (3, 32, 32), 10, whiten_bias_epochs=0)


def test_the_preset_freezes_the_whitening_bias_after_3_epochs(compose_config):
    cfg = compose_config(["experiment=cifar10_speedrun", "data=synthetic"])
    assert cfg.model.whiten_bias_epochs == 3 and cfg.aug.alternate_flips and cfg.aug.hflip


def small_net():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    net.frozen = nn.Linear(2, 2)
    net.frozen.requires_grad_(False)
    return net


@pytest.mark.parametrize("option", ["sgd", "adamw"])
def test_scale_multiplies_the_step_not_the_decay(compose_config, option):
    """With a gradient of ones and no decay the biases and norm parameters move `scale` times as far as
    with scale 1; with zero gradients (decay alone) every parameter shrinks alike, as with scale 1."""
    def moved(scale, grad, decay):
        torch.manual_seed(0)
        net = small_net()
        cfg = compose_config([f"optim={option}", f"optim.weight_decay={decay}", "optim.lr=0.01",
                              f"++optim.norm_and_bias_lr_scale={scale}"])
        optimizer = build_optimizer(cfg.optim, net)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        for p in net.parameters():
            p.grad = torch.full_like(p, grad) if p.requires_grad else None
        optimizer.step()
        return {n: (p.detach() - before[n]).abs().max().item() for n, p in net.named_parameters()}

    plain, scaled = moved(1.0, 1.0, 0.0), moved(8.0, 1.0, 0.0)
    for name in plain:
        factor = 0 if name.startswith("frozen") else 8 if name.endswith("bias") or name.startswith("1.") else 1
        assert scaled[name] == pytest.approx(factor * plain[name], rel=1e-4), name
    plain, scaled = moved(1.0, 0.0, 0.1), moved(8.0, 0.0, 0.1)
    for name in plain:
        assert scaled[name] == pytest.approx(plain[name], rel=1e-4), name


def test_scale_one_keeps_the_old_groups(compose_config):
    net = small_net()
    cfg = compose_config(["optim=sgd", "++optim.norm_and_bias_lr_scale=1.0"])
    assert len(build_optimizer(cfg.optim, net).param_groups) == 1
    assert len(build_optimizer(compose_config(["optim=sgd"]).optim, net).param_groups) == 1  # the key may be absent
    assert [len(g["params"]) for g in param_groups(net, False)] == [2, 4]
    with pytest.raises(UserError, match="optim.norm_and_bias_lr_scale=0"):
        build_optimizer(compose_config(["optim=sgd", "++optim.norm_and_bias_lr_scale=0"]).optim, net)


@pytest.mark.parametrize("sched", ["cosine", "step", "constant", "exponential"])
def test_schedules_keep_the_lr_ratio(compose_config, sched):
    model = airbench_model()
    cfg = compose_config(["optim=nesterov", f"sched={sched}", "sched.warmup_epochs=1",
                          "++optim.norm_and_bias_lr_scale=64"])
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=4, steps_per_epoch=3)
    seen = set()
    for epoch in range(4):
        for _ in range(3):
            weights, scaled = (g["lr"] for g in optimizer.param_groups)
            assert scaled == pytest.approx(64 * weights)
            seen.add(round(weights, 12))
            scheduler.step_batch()
        scheduler.step_epoch(1.0, 0.5)
    assert len(seen) > 1  # the lr did change


def test_resume_restores_the_scaled_lr(compose_config):
    """As tasks/train.py's _restore: the optimizer state comes back, the group settings are this run's."""
    x, y = correlated_images(n=8), torch.arange(8) % 10
    cfg = compose_config(["optim=nesterov", "sched=cosine", "++optim.norm_and_bias_lr_scale=64"])
    model = airbench_model()
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.sched, optimizer, epochs=3, steps_per_epoch=2)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step_batch()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    lrs = [g["lr"] for g in optimizer.param_groups]

    fresh = airbench_model()
    optimizer2 = build_optimizer(cfg.optim, fresh)
    scheduler2 = build_scheduler(cfg.sched, optimizer2, epochs=3, steps_per_epoch=2)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer2.param_groups]
    optimizer2.load_state_dict(saved_optimizer)
    for group, own in zip(optimizer2.param_groups, settings):
        group.update(own)
    scheduler2.load_state_dict(saved_scheduler)
    assert [g["lr"] for g in optimizer2.param_groups] == pytest.approx(lrs)
    assert lrs[1] == pytest.approx(64 * lrs[0])
    momentum = optimizer2.state[optimizer2.param_groups[1]["params"][0]]["momentum_buffer"]
    assert momentum.shape == (64,)  # block1.bn1.bias's buffer: the groups line up
