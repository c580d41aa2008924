"""Weight initialization: the schemes' statistics, native = the constructor's init, the output-layer
rule (initial loss ln C), and why zero init fails. Also build_model and the registry's names and kinds."""
import inspect
import logging
import math

import pytest
import torch
import torch.nn as nn

from cvtrain import UserError
from cvtrain.models import build_model, create_model, final_layer, init_weights, list_models, model_kind
from cvtrain.models.init import CHOICES, SCHEMES, output_rms
from cvtrain.models.knn import KNNClassifier
from cvtrain.models.registry import _KIND, _MODELS, register_model


def initialized(module, scheme, bias_init=0.0, seed=0):
    torch.manual_seed(seed)
    init_weights(module, scheme, bias_init)
    return module


def hidden(layer, scheme, bias_init=0.0):
    """`layer` initialized as a hidden layer: followed by an output layer, which takes the output rule."""
    initialized(nn.Sequential(layer, nn.ReLU(), nn.Linear(2, 2)), scheme, bias_init)
    return layer


def rms(t) -> float:
    return t.square().mean().sqrt().item()


def close(actual, expected, rel=0.05):
    return actual == pytest.approx(expected, rel=rel)


def test_kaiming_std_is_sqrt_2_over_fan_in():
    layer = hidden(nn.Linear(1000, 500), "kaiming")
    assert close(layer.weight.std().item(), math.sqrt(2 / 1000))
    assert abs(layer.weight.mean().item()) < 1e-3
    conv = hidden(nn.Conv2d(64, 128, 3), "kaiming")
    assert close(conv.weight.std().item(), math.sqrt(2 / (64 * 9)))


def test_xavier_std_is_sqrt_2_over_fan_in_plus_fan_out():
    layer = hidden(nn.Linear(1000, 500), "xavier")
    assert close(layer.weight.std().item(), math.sqrt(2 / 1500))


def test_small_random_std_is_0_01():
    layer = hidden(nn.Linear(1000, 500), "small_random")
    assert close(layer.weight.std().item(), 0.01)


def test_sparse_zeroes_90_percent_of_every_column():
    layer = hidden(nn.Linear(200, 100), "sparse")
    zero_fraction = (layer.weight == 0).float().mean(0)  # per column (input)
    assert torch.all(zero_fraction == 0.9)
    conv = hidden(nn.Conv2d(3, 64, 3), "sparse")
    zero_fraction = (conv.weight.view(64, -1) == 0).float().mean(0)  # (out, in*kh*kw)
    assert torch.all((zero_fraction >= 0.9) & (zero_fraction < 0.95))
    assert close(conv.weight[conv.weight != 0].std().item(), 0.01, rel=0.3)


def test_zeros_logs_a_symmetry_warning(caplog):
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    with caplog.at_level(logging.WARNING, logger="cvtrain"):
        initialized(model, "zeros")
    assert all(torch.all(m.weight == 0) for m in model if isinstance(m, nn.Linear))
    assert "symmetry" in caplog.text


def test_native_keeps_the_constructors_init_but_the_output_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.normal_()
        model[3].weight.mul_(100)  # an output layer far too large
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initialized(model, "native")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if not k.startswith("3."))
    assert rms(model[3].weight) == pytest.approx(0.1 / math.sqrt(4))  # scaled down to the bound...
    assert torch.allclose(model[3].weight / before["3.weight"], torch.tensor(0.1 / math.sqrt(4)) / rms(
        before["3.weight"]))  # ...keeping its shape
    assert torch.all(model[3].bias == 0)


def test_native_bias_init_zero_keeps_the_biases_nonzero_sets_all_but_the_output_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    conv_bias = model[0].bias.clone()
    initialized(model, "native", bias_init=0.0)
    assert torch.equal(model[0].bias, conv_bias) and torch.all(model[3].bias == 0)
    initialized(model, "native", bias_init=0.01)
    assert torch.all(model[0].bias == 0.01) and torch.all(model[3].bias == 0)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_biases_get_bias_init_and_norm_layers_stay_identity(scheme):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4),
                          nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.Linear(4, 3))
    with torch.no_grad():  # scramble the norm layers first
        for norm in (model[1], model[5], model[6]):
            norm.weight.normal_()
            norm.bias.normal_()
    initialized(model, scheme, bias_init=0.1)
    conv, bn, linear, ln, gn, out = model[0], model[1], model[4], model[5], model[6], model[7]
    assert torch.all(conv.bias == 0.1) and torch.all(linear.bias == 0.1)
    assert torch.all(out.bias == 0)  # the output layer: bias 0 whatever bias_init
    for norm in (bn, ln, gn):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


@pytest.mark.parametrize("name", ["he", "default", "torch"])
def test_unknown_scheme_is_a_user_error_listing_the_choices(name):
    with pytest.raises(UserError, match="native, zeros, small_random, xavier, kaiming, sparse"):
        init_weights(nn.Linear(2, 2), name)


def test_native_is_pytorchs_default_for_tanh_mlp_and_lenet_and_explicit_schemes_override_it():
    """PyTorch's default layer init: kaiming_uniform(a=sqrt(5)), std = 1 / sqrt(3 fan_in)."""
    def build(name, scheme, **options):
        shape = (1, 40, 25) if name == "mlp" else (1, 28, 28)
        torch.manual_seed(0)
        return build_model({"name": name, "init": scheme, **options}, shape, 10)

    mlp = build("mlp", "native", hidden_sizes=(500,), activation="tanh")
    assert close(mlp.fc1.weight.std().item(), 1 / math.sqrt(3 * 1000))
    lenet = build("lenet", "native")
    conv2, fc1 = lenet.features.conv2, lenet.classifier.fc1
    assert close(conv2.weight.std().item(), 1 / math.sqrt(3 * 20 * 25))
    assert close(fc1.weight.std().item(), 1 / math.sqrt(3 * 2450))

    mlp = build("mlp", "xavier", hidden_sizes=(500,), activation="tanh")
    assert close(mlp.fc1.weight.std().item(), math.sqrt(2 / (1000 + 500)))  # 1000 -> 500, xavier
    lenet = build("lenet", "kaiming")
    conv2, fc1 = lenet.features.conv2, lenet.classifier.fc1
    assert close(conv2.weight.std().item(), math.sqrt(2 / (20 * 25)))  # kaiming, fan_in = 500
    assert close(fc1.weight.std().item(), math.sqrt(2 / 2450))


def test_native_resnet_convs_are_kaiming_fan_out_and_kaiming_overrides_with_fan_in():
    native = build_model({"name": "resnet20"}, (3, 32, 32), 10)
    conv = native.layer2[0].conv1  # 16 -> 32 channels, 3x3: fan_in 144, fan_out 288
    assert close(conv.weight.std().item(), math.sqrt(2 / (32 * 9)))
    explicit = build_model({"name": "resnet20", "init": "kaiming"}, (3, 32, 32), 10)
    assert close(explicit.layer2[0].conv1.weight.std().item(), math.sqrt(2 / (16 * 9)))
    imagenet = build_model({"name": "resnet18"}, (3, 224, 224), 10)
    assert close(imagenet.layer3[0].conv1.weight.std().item(), math.sqrt(2 / (256 * 9)))  # 128 -> 256


@pytest.mark.parametrize("scheme", CHOICES)
@pytest.mark.parametrize("name,shape", [("lenet", (1, 28, 28)), ("nin", (3, 32, 32)), ("resnet20", (3, 32, 32))])
def test_the_output_layer_starts_small_under_every_scheme(name, shape, scheme):
    torch.manual_seed(0)
    model = build_model({"name": name, "init": scheme, "bias_init": 0.1}, shape, 10)
    out = final_layer(model, shape)
    if scheme == "zeros":
        assert torch.all(out.weight == 0) and torch.all(out.bias == 0)
        return
    assert 0 < rms(out.weight) <= output_rms(out) * (1 + 1e-6) and torch.all(out.bias == 0)
    if scheme != "sparse":  # sparse: 90% zeros and N(0, 0.01) are below the bound already
        assert rms(out.weight) >= output_rms(out) * 0.5
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model.train()(torch.randn(16, *shape)), torch.randint(0, 10, (16,)))
    assert loss.item() == pytest.approx(math.log(10), rel=0.1)


def test_the_output_layer_is_nins_last_conv_and_the_fc_elsewhere():
    nin = create_model("nin", (3, 32, 32), 10)
    assert final_layer(nin, (3, 32, 32)) is nin.features.conv9 is nin.features[-1]
    assert final_layer(create_model("resnet50", (3, 32, 32), 10), (3, 32, 32)).out_features == 10
    assert final_layer(create_model("vgg11", (3, 32, 32), 10), (3, 32, 32)) is not None


@pytest.mark.parametrize("name", list_models("trained"))
def test_the_called_output_layer_is_the_last_registered_one(name):
    """init_weights without an input shape takes the last Conv/Linear registered: true of every model."""
    shape = (3, 224, 224) if "variant" in inspect.signature(_MODELS[name]).parameters else (3, 32, 32)
    with torch.device("meta"):
        model = create_model(name, shape, 10)
    assert final_layer(model, shape) is final_layer(model)


# --- build_model, names and kinds ---------------------------------------------------------

def test_build_model_takes_a_dictconfig_or_a_dict(compose_config):
    cfg = compose_config(["model=mlp", "model.hidden_sizes=[32,16]", "model.init=kaiming"])
    torch.manual_seed(0)
    a = build_model(cfg.model, (1, 8, 8), 10)
    torch.manual_seed(0)
    b = build_model({"name": "mlp", "hidden_sizes": [32, 16], "init": "kaiming"}, (1, 8, 8), 10)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.fc1.out_features == 32
    assert cfg.model.name == "mlp" and "init" in cfg.model  # the config is not consumed


def test_build_model_errors_name_the_choices():
    with pytest.raises(UserError, match="registered models: airbench, alexnet"):
        build_model({"name": "lenet6"}, (1, 28, 28), 10)
    with pytest.raises(UserError, match="model.name is missing"):
        build_model({"init": "native"}, (1, 28, 28), 10)
    with pytest.raises(UserError, match="model.init='he'"):
        build_model({"name": "lenet", "init": "he"}, (1, 28, 28), 10)


def test_knn_is_a_fitted_model_built_without_init(compose_config):
    assert model_kind("knn") == "fitted" and model_kind("lenet") == "trained"
    assert "knn" in list_models() and list_models("fitted") == ["knn"] and "knn" not in list_models("trained")
    cfg = compose_config(["model=knn", "model.cv_folds=5", "model.k=3"])
    assert "init" not in cfg.model and "bias_init" not in cfg.model
    knn = build_model(cfg.model, (1, 28, 28), 10)
    assert isinstance(knn, KNNClassifier) and (knn.k, knn.cv_folds, knn.distance) == (3, 5, "l2")
    with pytest.raises(UserError, match=r"no option\(s\) \['init'\]"):
        build_model({"name": "knn", "init": "native"}, (1, 28, 28), 10)
    with pytest.raises(UserError, match="registered models: airbench, alexnet"):
        model_kind("knn2")


@pytest.fixture
def scratch_registry():
    """Registrations made in a test are removed after it."""
    names = set(_MODELS)
    yield
    for name in set(_MODELS) - names:
        del _MODELS[name], _KIND[name]


def test_register_model_takes_the_name_from_the_function(scratch_registry):
    @register_model
    def tiny_bare(in_shape, num_classes):
        return nn.Linear(1, num_classes)

    @register_model()
    def tiny_call(in_shape, num_classes):
        return nn.Linear(1, num_classes)

    @register_model("tiny_named")
    def builder(in_shape, num_classes):
        return nn.Linear(1, num_classes)

    @register_model(kind="fitted")
    def tiny_fitted(in_shape, num_classes, k=1):
        return KNNClassifier(k)

    assert {"tiny_bare", "tiny_call", "tiny_named", "tiny_fitted"} <= set(list_models())
    assert "builder" not in list_models() and tiny_bare.__name__ == "tiny_bare"  # the decorator returns the builder
    assert [model_kind(n) for n in ("tiny_bare", "tiny_call", "tiny_named", "tiny_fitted")] == \
        ["trained", "trained", "trained", "fitted"]
    assert isinstance(build_model({"name": "tiny_fitted", "k": 2}, (1, 1, 1), 3), KNNClassifier)
    with pytest.raises(ValueError, match="registered twice"):
        register_model(tiny_bare)
    with pytest.raises(ValueError, match="kind 'lazy'"):
        register_model(kind="lazy")


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
    return model.fc1.weight.detach()


def test_zero_init_never_breaks_symmetry():
    hidden = train_hidden_layer("zeros")
    assert hidden.abs().max() > 1e-3  # the weights did learn something...
    assert torch.allclose(hidden, hidden[0].expand_as(hidden), atol=1e-6)  # ...but every unit the same
    hidden = train_hidden_layer("small_random")
    assert not torch.allclose(hidden, hidden[0].expand_as(hidden), atol=1e-3)  # random init: units differ
