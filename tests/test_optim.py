"""Every optim= config takes the course's update steps, written out by hand; param groups for weight decay.

Each optimizer is built from its config by build_optimizer and run for a few steps on a
float64 weight matrix with a gradient that depends on the weights (so a wrong update would
send the two paths apart); the hand-written rule, fed the config's own values, must land on
the same weights after every step.
"""
import importlib.resources

import pytest
import torch

from cvtrain.optim import build_optimizer, param_groups

STEPS = 5
X0 = torch.linspace(-1.5, 2.0, 12, dtype=torch.float64).reshape(3, 4)  # 2-D: weight decay applies
A = torch.linspace(0.5, 3.0, 12, dtype=torch.float64).reshape(3, 4)


def grad(x):
    """The gradient of the loss sum(A * x**2 / 2 + sin(3x) / 3) at x."""
    return A * x + torch.cos(3 * x)


class Weight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(X0.clone())


def torch_path(optim_cfg, steps=STEPS, lrs=None):
    """The weights after each of `steps` steps of the configured optimizer (optionally with lr lrs[i] at step i)."""
    model = Weight()
    optimizer = build_optimizer(optim_cfg, model)
    path, buffers = [], []
    for i in range(steps):
        if lrs:
            optimizer.param_groups[0]["lr"] = lrs[i]
        model.weight.grad = grad(model.weight.detach())
        optimizer.step()
        path.append(model.weight.detach().clone())
        buffer = optimizer.state[model.weight].get("momentum_buffer")
        buffers.append(None if buffer is None else buffer.clone())
    return path, buffers


# --- the course's rules; `o` is the optim config as a dict --------------------------------------

def sgd_rule(o):
    assert o["momentum"] == 0
    x = X0.clone()
    for _ in range(STEPS):
        dx = grad(x) + o["weight_decay"] * x  # weight decay = L2 on the gradient
        x = x - o["lr"] * dx
        yield x


def momentum_rule(o, lrs=None):
    assert o["momentum"] > 0 and not o["nesterov"] and o["dampening"] == 0
    mu, x, v = o["momentum"], X0.clone(), torch.zeros_like(X0)
    for i in range(STEPS):
        lr = lrs[i] if lrs else o["lr"]
        dx = grad(x) + o["weight_decay"] * x
        v = mu * v - lr * dx
        x = x + v
        yield x, v


def nesterov_rule(o):
    assert o["momentum"] > 0 and o["nesterov"] and o["dampening"] == 0
    mu, x, v = o["momentum"], X0.clone(), torch.zeros_like(X0)
    for _ in range(STEPS):
        dx = grad(x) + o["weight_decay"] * x
        v_prev = v
        v = mu * v - o["lr"] * dx
        x = x - mu * v_prev + (1 + mu) * v
        yield x


def adagrad_rule(o):
    assert o["lr_decay"] == 0 and o["initial_accumulator_value"] == 0
    x, cache = X0.clone(), torch.zeros_like(X0)
    for _ in range(STEPS):
        dx = grad(x) + o["weight_decay"] * x
        cache = cache + dx ** 2
        x = x - o["lr"] * dx / (torch.sqrt(cache) + o["eps"])
        yield x


def rmsprop_rule(o):
    assert o["momentum"] == 0 and not o["centered"]
    decay, x, cache = o["alpha"], X0.clone(), torch.zeros_like(X0)
    for _ in range(STEPS):
        dx = grad(x) + o["weight_decay"] * x
        cache = decay * cache + (1 - decay) * dx ** 2
        x = x - o["lr"] * dx / (torch.sqrt(cache) + o["eps"])
        yield x


def adam_rule(o, decoupled=False):
    (beta1, beta2), eps, lr, wd = o["betas"], o["eps"], o["lr"], o["weight_decay"]
    x, m, v = X0.clone(), torch.zeros_like(X0), torch.zeros_like(X0)
    for t in range(1, STEPS + 1):
        dx = grad(x)
        if decoupled:
            x = x - lr * wd * x  # AdamW: shrink the weights, apart from the gradient
        else:
            dx = dx + wd * x  # Adam: L2 on the gradient, which then goes through m and v
        m = beta1 * m + (1 - beta1) * dx
        v = beta2 * v + (1 - beta2) * dx ** 2
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        x = x - lr * m_hat / (torch.sqrt(v_hat) + eps)
        yield x


RULES = {
    "sgd": sgd_rule,
    "momentum": lambda o: (x for x, _ in momentum_rule(o)),
    "nesterov": nesterov_rule,
    "adagrad": adagrad_rule,
    "rmsprop": rmsprop_rule,
    "adam": adam_rule,
    "adamw": lambda o: adam_rule(o, decoupled=True),
}


def optim_config(compose_config, option, *overrides):
    cfg = compose_config([f"optim={option}", *overrides])
    return cfg.optim, dict(cfg.optim)


def test_every_optim_option_has_a_rule():
    options = {f.name.removesuffix(".yaml") for f in (importlib.resources.files("cvtrain.configs") / "optim").iterdir()
               if f.name.endswith(".yaml")}
    assert options == set(RULES)


@pytest.mark.parametrize("overrides", [[], ["optim.weight_decay=0.1"]], ids=["config", "weight_decay"])
@pytest.mark.parametrize("option", sorted(RULES))
def test_optimizer_follows_the_course_rule(compose_config, option, overrides):
    cfg, values = optim_config(compose_config, option, *overrides)
    expected = list(RULES[option](values))
    actual, _ = torch_path(cfg)
    assert len(actual) == len(expected) == STEPS
    for step, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=f"{option}: step {step + 1}")
    assert not torch.allclose(actual[-1], X0)


def test_course_defaults(compose_config):
    adam = compose_config(["optim=adam"]).optim
    assert list(adam.betas) == [0.9, 0.999] and adam.eps == 1e-8
    assert list(compose_config(["optim=adamw"]).optim.betas) == [0.9, 0.999]
    sgd, momentum, nesterov = (compose_config([f"optim={o}"]).optim for o in ("sgd", "momentum", "nesterov"))
    assert sgd.momentum == 0 and not sgd.nesterov
    assert momentum.momentum == 0.9 and not momentum.nesterov
    assert nesterov.momentum == 0.9 and nesterov.nesterov
    assert compose_config(["optim=rmsprop"]).optim.alpha == 0.99


def test_torch_momentum_buffer_is_the_course_velocity_over_lr(compose_config):
    """torch: b = mu*b + dx; x -= lr*b. Course: v = mu*v - lr*dx; x += v. With a constant lr, v = -lr*b."""
    cfg, values = optim_config(compose_config, "momentum")
    _, buffers = torch_path(cfg)
    for step, (b, (_, v)) in enumerate(zip(buffers, momentum_rule(values))):
        torch.testing.assert_close(-values["lr"] * b, v, rtol=1e-10, atol=1e-12, msg=f"step {step + 1}")


def test_momentum_forms_part_when_the_lr_changes(compose_config):
    """When a schedule changes the lr, torch's form rescales the whole velocity at once, the course's
    form only the new gradient's share: the two agree before the change, not after."""
    cfg, values = optim_config(compose_config, "momentum")
    lrs = [0.05, 0.05, 0.005, 0.005, 0.005]
    actual, _ = torch_path(cfg, lrs=lrs)
    expected = [x for x, _ in momentum_rule(values, lrs=lrs)]
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(actual[2], expected[2])


def test_nesterov_is_the_textbook_lookahead(compose_config):
    """Textbook Nesterov takes the gradient at the lookahead x + mu*v: v = mu*v - lr*dx(x + mu*v); x += v.
    The course's (and torch's) form stores the lookahead point itself as the parameter."""
    cfg, o = optim_config(compose_config, "nesterov", "optim.weight_decay=0")
    mu, lr = o["momentum"], o["lr"]
    x, v = X0.clone(), torch.zeros_like(X0)
    actual, _ = torch_path(cfg)
    for step in range(STEPS):
        v = mu * v - lr * grad(x + mu * v)
        x = x + v
        torch.testing.assert_close(actual[step], x + mu * v, rtol=1e-10, atol=1e-12, msg=f"step {step + 1}")


# --- param groups: weight decay on biases and normalization parameters -----------------------------

def small_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),         # 0: weight (decay), bias
        torch.nn.BatchNorm2d(4),          # 1: weight, bias
        torch.nn.PReLU(),                 # 2: weight, 1-D
        torch.nn.LayerNorm([4, 4, 4]),    # 3: 3-D weight and bias, but a normalization layer
        torch.nn.Flatten(),
        torch.nn.Linear(64, 3),           # 5: weight (decay), bias
    )
    net.frozen = torch.nn.Linear(2, 2)    # requires_grad False: in no group
    net.frozen.requires_grad_(False)
    return net


def ids(params):
    return [id(p) for p in params]


def test_one_group_by_default(compose_config):
    net = small_net()
    optimizer = build_optimizer(compose_config(["optim=sgd"]).optim, net)
    assert len(optimizer.param_groups) == 1
    assert ids(optimizer.param_groups[0]["params"]) == ids(p for p in net.parameters() if p.requires_grad)
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4


@pytest.mark.parametrize("option", sorted(RULES))
def test_no_decay_group_holds_biases_and_norm_parameters(compose_config, option):
    net = small_net()
    cfg = compose_config([f"optim={option}", "optim.decay_norm_and_bias=false", "optim.weight_decay=0.1"])
    optimizer = build_optimizer(cfg.optim, net)
    decay, no_decay = optimizer.param_groups
    assert ids(decay["params"]) == ids([net[0].weight, net[5].weight])
    assert ids(no_decay["params"]) == ids([net[0].bias, net[1].weight, net[1].bias, net[2].weight,
                                           net[3].weight, net[3].bias, net[5].bias])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == cfg.optim.lr


def test_param_groups_without_exemptions_or_without_norm_layers():
    linear = torch.nn.Linear(3, 2, bias=False)
    assert [len(g["params"]) for g in param_groups(linear, decay_norm_and_bias=False)] == [1]
    bn = torch.nn.BatchNorm1d(3)
    groups = param_groups(bn, decay_norm_and_bias=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("option", ["sgd", "adamw"])  # coupled (L2 in the gradient) and decoupled decay
@pytest.mark.parametrize("decay_norm_and_bias", [True, False])
def test_bias_is_not_decayed(compose_config, option, decay_norm_and_bias):
    """With zero gradients only weight decay moves a parameter: it shrinks every weight matrix,
    and the biases and normalization parameters only with decay_norm_and_bias=true."""
    net = small_net()
    for p in net.parameters():
        p.data.fill_(2.0)
    cfg = compose_config([f"optim={option}", f"optim.decay_norm_and_bias={decay_norm_and_bias}",
                          "optim.weight_decay=0.1"])
    optimizer = build_optimizer(cfg.optim, net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    shrunk = 2.0 * (1 - cfg.optim.lr * 0.1)
    for name, p in net.named_parameters():
        is_matrix = name in ("0.weight", "5.weight")
        expected = 2.0 if name.startswith("frozen") else shrunk if is_matrix or decay_norm_and_bias else 2.0
        torch.testing.assert_close(p.detach(), torch.full_like(p, expected), msg=name)
