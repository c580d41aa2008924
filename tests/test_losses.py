import math

import pytest
import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.config import RegConfig
from cvtrain.losses import MulticlassHingeLoss, OneHotMSELoss, Regularizer, build_loss


@pytest.mark.parametrize("squared,p", [(False, 1), (True, 2)])
def test_hinge_matches_multimarginloss_times_classes(squared, p):
    scores, target = torch.randn(32, 10), torch.randint(0, 10, (32,))
    ours = MulticlassHingeLoss(margin=1.0, squared=squared)(scores, target)
    # torch divides the sum over wrong classes by the number of classes
    reference = torch.nn.MultiMarginLoss(p=p, margin=1.0)(scores, target) * 10
    assert torch.allclose(ours, reference, atol=1e-6)


def test_hinge_at_zero_scores_is_classes_minus_one():
    scores = torch.zeros(8, 10)
    assert MulticlassHingeLoss(margin=1.0)(scores, torch.randint(0, 10, (8,))).item() == pytest.approx(9.0)


def test_hinge_worked_example_from_the_course():
    # scores for cat/car/frog with the correct class cat: max(0, 5.1-3.2+1) + max(0, -1.7-3.2+1) = 2.9
    scores = torch.tensor([[3.2, 5.1, -1.7]])
    assert MulticlassHingeLoss(margin=1.0)(scores, torch.tensor([0])).item() == pytest.approx(2.9, abs=1e-5)


def test_build_loss_by_name_and_unknown_name():
    assert isinstance(build_loss(OmegaConf.create({"name": "hinge", "margin": 2.0})), MulticlassHingeLoss)
    squared = build_loss({"name": "squared_hinge", "margin": 2.0})
    assert squared.squared and squared.margin == 2.0
    with pytest.raises(UserError, match="cross_entropy"):
        build_loss(OmegaConf.create({"name": "focal"}))
    with pytest.raises(UserError, match="loss.squared: not an argument of loss=hinge; its keys are margin$"):
        build_loss({"name": "hinge", "margin": 1.0, "squared": True})
    with pytest.raises(UserError, match="loss=squared_hinge needs loss.margin"):
        build_loss({"name": "squared_hinge"})


def test_regularizer_l2_and_l1_cover_weights_not_biases():
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(100.0)
    reg = Regularizer(OmegaConf.structured(RegConfig(l2=0.1, l1=0.01)), model)
    assert reg()
    expected = 0.5 * 0.1 * (4 * 12) + 0.01 * (2 * 12)
    assert reg().item() == pytest.approx(expected)
    assert not Regularizer(OmegaConf.structured(RegConfig()), model)


# --- every loss against a value computed by hand ------------------------------------------------
# the course's three examples: scores for (cat, car, frog); the correct classes are cat, car, frog
COURSE_SCORES = torch.tensor([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
COURSE_TARGETS = torch.tensor([0, 1, 2])


def loss_of(name, scores=COURSE_SCORES, target=COURSE_TARGETS, **options):
    return build_loss(OmegaConf.create({"name": name, **options}))(scores, target).item()


def test_cross_entropy_by_hand():
    # cat example: -ln(e^3.2 / (e^3.2 + e^5.1 + e^-1.7)) = 2.04
    assert loss_of("cross_entropy", COURSE_SCORES[:1], COURSE_TARGETS[:1]) == pytest.approx(2.0404, abs=1e-4)
    # label smoothing eps: target (1 - eps) on the class + eps / C on every class
    eps, log_p = 0.1, [s - math.log(sum(math.exp(t) for t in (3.2, 5.1, -1.7))) for s in (3.2, 5.1, -1.7)]
    expected = -(1 - eps) * log_p[0] - eps / 3 * sum(log_p)
    assert loss_of("cross_entropy", COURSE_SCORES[:1], COURSE_TARGETS[:1], label_smoothing=eps) == \
        pytest.approx(expected, abs=1e-5)


def test_hinge_and_squared_hinge_by_hand():
    # per example: max(0, 5.1-3.2+1) = 2.9 | 0 + 0 | max(0, 2.2+3.1+1) + max(0, 2.5+3.1+1) = 6.3 + 6.6
    assert loss_of("hinge", margin=1.0) == pytest.approx((2.9 + 0 + 12.9) / 3, abs=1e-5)  # 5.27, the course's value
    assert loss_of("squared_hinge", margin=1.0) == pytest.approx((2.9**2 + 0 + 6.3**2 + 6.6**2) / 3, abs=1e-4)
    # margin 2: 3.9 + max(0, -1.7-3.2+2) | max(0, 1.3-4.9+2) + max(0, 2.0-4.9+2) | 7.3 + 7.6
    assert loss_of("hinge", margin=2.0) == pytest.approx((3.9 + 0 + 0 + 0 + 7.3 + 7.6) / 3, abs=1e-5)


def test_mse_by_hand_and_against_torch():
    # sum over classes of (s_j - onehot_j)^2, mean over the batch
    expected = ((3.2 - 1)**2 + 5.1**2 + 1.7**2 + 1.3**2 + (4.9 - 1)**2 + 2.0**2 + 2.2**2 + 2.5**2 + (3.1 + 1)**2) / 3
    assert loss_of("mse") == pytest.approx(expected, abs=1e-4)
    assert isinstance(build_loss(OmegaConf.create({"name": "mse"})), OneHotMSELoss)
    scores, target = torch.randn(16, 7), torch.randint(0, 7, (16,))
    reference = torch.nn.MSELoss()(scores, torch.nn.functional.one_hot(target, 7).float()) * 7  # mean over all
    torch.testing.assert_close(OneHotMSELoss()(scores, target), reference)
    assert loss_of("mse", torch.nn.functional.one_hot(target, 7).float(), target) == 0


@pytest.mark.parametrize("loss", ["cross_entropy", "hinge", "squared_hinge", "mse"])
@pytest.mark.parametrize("model", ["linear", "mlp", "lenet"])
def test_any_model_trains_with_any_loss(compose_config, loss, model):
    from cvtrain.models import build_model

    cfg = compose_config([f"loss={loss}", f"model={model}"])
    net = build_model(cfg.model, (1, 28, 28), 10)
    value = build_loss(cfg.loss)(net(torch.randn(4, 1, 28, 28)), torch.randint(0, 10, (4,)))
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert all(p.grad is not None for p in net.parameters())
