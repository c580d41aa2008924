"""Weight initialization schemes: their statistics, the default's choice, and why zero init fails."""
import logging
import math

import pytest
import torch
import torch.nn as nn

from cvtrain import UserError
from cvtrain.models import create_model, init_weights
from cvtrain.models.init import CHOICES, default_scheme


def initialized(module, scheme, bias_init=0.0, seed=0):
    torch.manual_seed(seed)
    init_weights(module, scheme, bias_init)
    return module


def close(actual, expected, rel=0.05):
    return actual == pytest.approx(expected, rel=rel)


def test_kaiming_std_is_sqrt_2_over_fan_in():
    layer = initialized(nn.Linear(1000, 500), "kaiming")
    assert close(layer.weight.std().item(), math.sqrt(2 / 1000))
    assert abs(layer.weight.mean().item()) < 1e-3
    conv = initialized(nn.Conv2d(64, 128, 3), "kaiming")
    assert close(conv.weight.std().item(), math.sqrt(2 / (64 * 9)))


def test_xavier_std_is_sqrt_2_over_fan_in_plus_fan_out():
    layer = initialized(nn.Linear(1000, 500), "xavier")
    assert close(layer.weight.std().item(), math.sqrt(2 / 1500))


def test_small_random_std_is_0_01():
    layer = initialized(nn.Linear(1000, 500), "small_random")
    assert close(layer.weight.std().item(), 0.01)


def test_sparse_zeroes_90_percent_of_every_column():
    layer = initialized(nn.Linear(200, 100), "sparse")
    zero_fraction = (layer.weight == 0).float().mean(0)  # per column (input)
    assert torch.all(zero_fraction == 0.9)
    conv = initialized(nn.Conv2d(3, 64, 3), "sparse")
    zero_fraction = (conv.weight.view(64, -1) == 0).float().mean(0)  # (out, in*kh*kw)
    assert torch.all((zero_fraction >= 0.9) & (zero_fraction < 0.95))
    assert close(conv.weight[conv.weight != 0].std().item(), 0.01, rel=0.3)


def test_zeros_logs_a_symmetry_warning(caplog):
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    with caplog.at_level(logging.WARNING, logger="cvtrain"):
        initialized(model, "zeros")
    assert all(torch.all(m.weight == 0) for m in model if isinstance(m, nn.Linear))
    assert "symmetry" in caplog.text


def test_torch_leaves_pytorchs_init_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initialized(model, "torch")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("scheme", [s for s in CHOICES if s != "torch"])
def test_biases_get_bias_init_and_norm_layers_stay_identity(scheme):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4),
                          nn.LayerNorm(4), nn.GroupNorm(2, 4))
    with torch.no_grad():  # scramble the norm layers first
        for norm in (model[1], model[5], model[6]):
            norm.weight.normal_()
            norm.bias.normal_()
    initialized(model, scheme, bias_init=0.1)
    conv, bn, linear, ln, gn = model[0], model[1], model[4], model[5], model[6]
    assert torch.all(conv.bias == 0.1) and torch.all(linear.bias == 0.1)
    for norm in (bn, ln, gn):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_unknown_scheme_is_a_user_error_listing_the_choices():
    with pytest.raises(UserError, match="kaiming.*sparse"):
        init_weights(nn.Linear(2, 2), "he")


def test_default_is_xavier_for_tanh_mlp_and_kaiming_for_lenet():
    mlp = create_model("mlp", (1, 40, 25), 10, hidden_sizes=(500,), activation="tanh")
    lenet = create_model("lenet", (1, 28, 28), 10)
    assert default_scheme(mlp) == "xavier"
    assert default_scheme(lenet) == "kaiming"
    assert default_scheme(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 2), nn.ReLU())) == "kaiming"

    initialized(mlp, "default")
    assert close(mlp[1].weight.std().item(), math.sqrt(2 / (1000 + 500)))  # 1000 -> 500, xavier
    initialized(lenet, "default")
    conv2, fc1 = lenet.features[3], lenet.classifier[1]
    assert close(conv2.weight.std().item(), math.sqrt(2 / (20 * 25)))  # kaiming, fan_in = 500
    assert close(fc1.weight.std().item(), math.sqrt(2 / 2450))


def train_hidden_layer(scheme, steps=30):
    """A sigmoid MLP trained a few SGD steps on random data; returns its hidden layer's weights."""
    torch.manual_seed(0)
    model = create_model("mlp", (1, 4, 4), 3, hidden_sizes=(8,), activation="sigmoid")
    init_weights(model, scheme)
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model[1].weight.detach()


def test_zero_init_never_breaks_symmetry():
    hidden = train_hidden_layer("zeros")
    assert hidden.abs().max() > 1e-3  # the weights did learn something...
    assert torch.allclose(hidden, hidden[0].expand_as(hidden), atol=1e-6)  # ...but every unit the same
    hidden = train_hidden_layer("small_random")
    assert not torch.allclose(hidden, hidden[0].expand_as(hidden), atol=1e-3)  # random init: units differ
