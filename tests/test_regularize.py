"""The `reg` group: L2 / L1 / elastic-net loss terms, max-norm projection, gradient clipping,
and L2 as SGD's weight decay."""
import dataclasses
import importlib.resources

import pytest
import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.config import RegConfig
from cvtrain.losses import Regularizer
from cvtrain.tasks.train import train

REG_OPTIONS = sorted(f.name.removesuffix(".yaml") for f in importlib.resources.files("cvtrain.configs").joinpath(
    "reg").iterdir() if f.name.endswith(".yaml"))


def reg(**fields):
    return OmegaConf.structured(RegConfig(**fields))


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5))


def term_gradients(net, reg_cfg):
    """The gradient of the regularization term alone, for every parameter."""
    net.zero_grad(set_to_none=True)
    Regularizer(reg_cfg, net)().backward()
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # biases: not in the term
            for name, p in net.named_parameters()}


# --- configs ----------------------------------------------------------------------------------

def test_reg_options_exist_and_set_only_their_own_fields(compose_config):
    assert {"none", "l2", "l1", "elastic_net", "max_norm"} <= set(REG_OPTIONS)
    fields = {f.name for f in dataclasses.fields(RegConfig)}
    own_keys = {}
    for option in REG_OPTIONS:
        own = OmegaConf.load(str(importlib.resources.files("cvtrain.configs") / "reg" / f"{option}.yaml"))
        assert set(own) <= fields, option
        own_keys[option] = set(own)
    assert own_keys["none"] == set() and own_keys["elastic_net"] == {"l1", "l2"}
    for option in REG_OPTIONS:  # every other key off, as in the schema
        composed = compose_config([f"reg={option}"]).reg
        assert all(composed[key] == 0 for key in fields - own_keys[option]), option
    elastic = compose_config(["reg=elastic_net"]).reg
    assert elastic.l1 > 0 and elastic.l2 > 0
    assert compose_config(["reg=max_norm"]).reg.max_norm > 0
    assert compose_config([]).reg == reg()  # reg=none: everything off


def test_negative_settings_are_user_errors():
    for name in ("l2", "l1", "max_norm", "grad_clip"):
        with pytest.raises(UserError, match=f"reg.{name}"):
            Regularizer(reg(**{name: -1.0}), model())


# --- loss terms: their gradients ---------------------------------------------------------------

def test_l2_term_adds_l2_times_w_to_the_gradient():
    net = model()
    grads = term_gradients(net, reg(l2=0.3))
    for name, p in net.named_parameters():
        expected = 0.3 * p.detach() if p.dim() > 1 else torch.zeros_like(p)  # biases are not regularized
        torch.testing.assert_close(grads[name], expected, msg=name)


def test_l1_term_adds_l1_times_sign_w_to_the_gradient():
    net = model()
    grads = term_gradients(net, reg(l1=0.05))
    for name, p in net.named_parameters():
        expected = 0.05 * p.detach().sign() if p.dim() > 1 else torch.zeros_like(p)
        torch.testing.assert_close(grads[name], expected, msg=name)


def test_elastic_net_adds_both():
    net = model()
    grads = term_gradients(net, reg(l2=0.3, l1=0.05))
    w = net[2].weight.detach()
    torch.testing.assert_close(grads["2.weight"], 0.3 * w + 0.05 * w.sign())
    value = Regularizer(reg(l2=0.3, l1=0.05), net)().item()
    weights = [net[0].weight, net[2].weight]
    assert value == pytest.approx(sum(0.15 * (w * w).sum().item() + 0.05 * w.abs().sum().item() for w in weights))


def test_l2_as_sgd_weight_decay_equals_the_loss_term():
    """One SGD step: w - lr * (g + wd * w), whether wd is the optimizer's weight_decay or reg.l2."""
    lr, wd = 0.1, 0.01
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 5, (8,))

    def step(net, weight_decay, reg_cfg):
        optimizer = torch.optim.SGD([net[0].weight, net[2].weight], lr=lr, weight_decay=weight_decay)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        regularizer = Regularizer(reg_cfg, net)
        if regularizer:
            loss = loss + regularizer()
        optimizer.zero_grad()
        loss.backward()
        grad = net[2].weight.grad.clone()
        optimizer.step()
        return net[2].weight.detach(), grad

    before = model()[2].weight.detach().clone()
    decayed, g = step(model(), wd, reg())
    with_term, _ = step(model(), 0.0, reg(l2=wd))
    torch.testing.assert_close(decayed, before - lr * (g + wd * before))
    torch.testing.assert_close(with_term, decayed)


# --- max-norm -------------------------------------------------------------------------------------

def unit_norms(w):
    return w.detach().flatten(1).norm(dim=1)


def test_max_norm_projects_each_unit_into_the_ball_and_leaves_small_ones_alone():
    net, c = model(), 0.8
    with torch.no_grad():  # unit norms: some inside the ball, some outside
        for w, norms in ((net[2].weight, [0.1, 0.5, 2.0, 5.0, 10.0]), (net[0].weight, [0.2, 3.0, 5.0, 0.3])):
            w.mul_((torch.tensor(norms) / unit_norms(w)).view(-1, *[1] * (w.dim() - 1)))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    torch.nn.functional.cross_entropy(net(torch.randn(8, 2, 5, 5)), torch.randint(0, 5, (8,))).backward()
    optimizer.step()
    stepped = {name: p.detach().clone() for name, p in net.named_parameters()}
    assert max(unit_norms(net[2].weight).max(), unit_norms(net[0].weight).max()) > c

    Regularizer(reg(max_norm=c), net).project_()
    for name, p in net.named_parameters():
        if p.dim() == 1:  # biases: untouched
            assert torch.equal(p, stepped[name])
            continue
        before, after = unit_norms(stepped[name]), unit_norms(p)
        assert (after <= c + 1e-5).all(), name
        inside = before <= c
        assert inside.any() and (~inside).any(), name
        assert torch.equal(p[inside], stepped[name][inside])  # units already in the ball: unchanged
        torch.testing.assert_close(after[~inside], torch.full_like(after[~inside], c))  # the rest: on the sphere
        # projection only rescales: same direction
        torch.testing.assert_close(p[~inside].flatten(1) / after[~inside, None],
                                   stepped[name][~inside].flatten(1) / before[~inside, None])


def test_max_norm_zero_is_off():
    net = model()
    with torch.no_grad():
        net[2].weight.mul_(100)
    before = net[2].weight.detach().clone()
    Regularizer(reg(), net).project_()
    assert torch.equal(net[2].weight, before)


# --- gradient clipping -----------------------------------------------------------------------------

def global_grad_norm(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()]).norm()


def test_grad_clip_bounds_the_global_norm_and_keeps_the_direction():
    net = model()
    (net(torch.randn(8, 2, 5, 5)) * 100).pow(2).mean().backward()
    raw = [p.grad.clone() for p in net.parameters()]
    norm = global_grad_norm(net)
    assert norm > 1.0
    Regularizer(reg(grad_clip=1.0), net).clip_grad_()
    assert global_grad_norm(net) == pytest.approx(1.0, rel=1e-4)
    for p, g in zip(net.parameters(), raw):  # every gradient scaled by the same factor
        torch.testing.assert_close(p.grad, g / norm, atol=1e-6, rtol=1e-4)


def test_grad_clip_leaves_small_gradients_alone():
    net = model()
    (net(torch.randn(8, 2, 5, 5)) * 1e-3).sum().backward()
    raw = [p.grad.clone() for p in net.parameters()]
    assert global_grad_norm(net) < 10
    Regularizer(reg(grad_clip=10.0), net).clip_grad_()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), raw))


# --- in the training loop --------------------------------------------------------------------------

def test_training_with_max_norm_and_clipping(compose_config, tmp_path):
    cfg = compose_config(["data=synthetic", "data.num_samples=256", "data.image_size=8", "model=mlp",
                          "reg=max_norm", "reg.max_norm=0.5", "reg.grad_clip=0.5", "optim.lr=0.05",
                          "trainer.epochs=1", "trainer.progress=false", "trainer.device=cpu"])
    summary = train(cfg, tmp_path)
    assert summary["epochs"] == 1
    weights = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    matrices = {name: w for name, w in weights.items() if w.dim() > 1}
    assert matrices
    for name, w in matrices.items():
        assert unit_norms(w).max() <= 0.5 + 1e-5, name
