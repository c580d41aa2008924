import pytest
import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.losses import MulticlassHingeLoss, Regularizer, build_loss


@pytest.mark.parametrize("squared,p", [(False, 1), (True, 2)])
def test_hinge_matches_multimarginloss_times_classes(squared, p):
    scores, target = torch.randn(32, 10), torch.randint(0, 10, (32,))
    ours = MulticlassHingeLoss(margin=1.0, squared=squared)(scores, target)
    # torch divides the sum over wrong classes by the number of classes
    reference = torch.nn.MultiMarginLoss(p=p, margin=1.0)(scores, target) * 10
    assert torch.allclose(ours, reference, atol=1e-6)


def test_hinge_at_zero_scores_is_classes_minus_one():
    scores = torch.zeros(8, 10)
    assert MulticlassHingeLoss()(scores, torch.randint(0, 10, (8,))).item() == pytest.approx(9.0)


def test_hinge_worked_example_from_the_course():
    # scores for cat/car/frog with the correct class cat: max(0, 5.1-3.2+1) + max(0, -1.7-3.2+1) = 2.9
    scores = torch.tensor([[3.2, 5.1, -1.7]])
    assert MulticlassHingeLoss()(scores, torch.tensor([0])).item() == pytest.approx(2.9, abs=1e-5)


def test_build_loss_by_name_and_unknown_name():
    assert isinstance(build_loss(OmegaConf.create({"name": "hinge", "margin": 2.0})), MulticlassHingeLoss)
    with pytest.raises(UserError, match="cross_entropy"):
        build_loss(OmegaConf.create({"name": "focal"}))


def test_regularizer_l2_and_l1_cover_weights_not_biases():
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(100.0)
    reg = Regularizer(OmegaConf.create({"l2": 0.1, "l1": 0.01}), model)
    assert reg()
    expected = 0.5 * 0.1 * (4 * 12) + 0.01 * (2 * 12)
    assert reg().item() == pytest.approx(expected)
    assert not Regularizer(OmegaConf.create({"l2": 0.0, "l1": 0.0}), model)
