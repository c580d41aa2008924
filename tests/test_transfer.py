"""Transfer learning (src/cvtrain/models/transfer.py): model.pretrained, model.freeze, optim.head_lr_mult, and the
data subset of the README example (data.classes, data.max_per_class; src/cvtrain/data/subset.py).

One tiny pretraining run (ResNet-20 on 10 classes of 8x8 synthetic images, 1 epoch) is shared by the tests
that load a cvtrain checkpoint; torchvision's weights are stood in for by torchvision's own freshly built
models (their state dicts have the names and shapes of the weight files), so nothing is downloaded.
"""
import urllib.error

import pytest
import torch
import torchvision

from cvtrain import UserError
from cvtrain.data import load_data
from cvtrain.models import build_model, create_model
from cvtrain.models.transfer import freeze, load_pretrained, model_head, torchvision_renamer
from cvtrain.optim import build_optimizer, build_scheduler, param_groups
from cvtrain.tasks.train import train
from cvtrain.validate import check_config

SYNTHETIC = ["data=synthetic", "data.num_samples=200", "data.image_size=8", "data.batch_size=32",
             "trainer.device=cpu", "trainer.progress=false", "trainer.viz=false"]


@pytest.fixture(scope="module")
def pretrained_run(compose_config, tmp_path_factory):
    """A 10-class ResNet-20 run dir (checkpoints/best.pt, last.pt)."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    train(compose_config([*SYNTHETIC, "model=resnet20", "trainer.epochs=1"]), run_dir)
    return run_dir


def checkpoint_model(run_dir, which="best"):
    return torch.load(run_dir / "checkpoints" / f"{which}.pt", weights_only=True)["model"]


def resnet20(classes=5, shape=(3, 8, 8)):
    torch.manual_seed(1)
    return build_model({"name": "resnet20"}, shape, classes)


# --- model.pretrained: a cvtrain checkpoint -----------------------------------------------------------------

def test_a_10_class_checkpoint_loads_into_a_5_class_model_replacing_only_the_head(pretrained_run):
    model = resnet20(classes=5)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    report = load_pretrained(model, str(pretrained_run), {"name": "resnet20"}, (3, 8, 8),
                             [f"class{i}" for i in range(5, 10)])
    saved, now = checkpoint_model(pretrained_run), model.state_dict()
    assert sorted(report["replaced"]) == ["fc.bias", "fc.weight"]
    assert report["left_new"] == report["unused"] == report["shape_differs"] == []
    assert len(report["loaded"]) == len(now) - 2
    for key, tensor in now.items():
        if key.startswith("fc."):
            assert tensor.shape[0] == 5 and torch.equal(tensor, fresh_head[key])  # the new init, kept
        else:
            assert torch.equal(tensor, saved[key]), key  # weights and BatchNorm statistics


def test_a_checkpoint_of_other_classes_replaces_the_head_even_at_the_same_count(pretrained_run):
    other = [f"class{i}" for i in range(10, 20)]
    model = resnet20(classes=10)
    report = load_pretrained(model, str(pretrained_run / "checkpoints" / "last.pt"), {"name": "resnet20"},
                             (3, 8, 8), other)
    assert sorted(report["replaced"]) == ["fc.bias", "fc.weight"]
    same = load_pretrained(resnet20(classes=10), str(pretrained_run), {"name": "resnet20"}, (3, 8, 8),
                           [f"class{i}" for i in range(10)])
    assert same["replaced"] == [] and len(same["loaded"]) == len(model.state_dict())  # same classes: the head too


def test_pretrained_errors_are_clear(pretrained_run, tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_pretrained(resnet20(), str(tmp_path / "nothing.pt"), {"name": "resnet20"}, (3, 8, 8))
    with pytest.raises(UserError, match="without checkpoints/best.pt"):
        load_pretrained(resnet20(), str(tmp_path), {"name": "resnet20"}, (3, 8, 8))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained(resnet20(), str(tmp_path / "garbage.pt"), {"name": "resnet20"}, (3, 8, 8))
    with pytest.raises(UserError, match="none of its .* tensors fits a parameter of model=lenet"):
        load_pretrained(build_model({"name": "lenet"}, (3, 8, 8), 5), str(pretrained_run), {"name": "lenet"},
                        (3, 8, 8))
    with pytest.raises(UserError, match=r"other channels \(3 there, 1 here\)"):
        load_pretrained(resnet20(shape=(1, 8, 8)), str(pretrained_run), {"name": "resnet20"}, (1, 8, 8))
    torch.save(checkpoint_model(pretrained_run), tmp_path / "plain.pt")  # no shape stored: the first conv says it
    with pytest.raises(UserError, match="first layer conv1.weight takes 3-channel images"):
        load_pretrained(resnet20(shape=(1, 8, 8)), str(tmp_path / "plain.pt"), {"name": "resnet20"}, (1, 8, 8))


# --- model.pretrained: torchvision's names and weights --------------------------------------------------------

def test_a_torchvision_state_dict_loads_into_resnet18_replacing_only_fc(tmp_path):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(theirs, tmp_path / "resnet18.pth")
    model = build_model({"name": "resnet18", "variant": "imagenet"}, (3, 64, 64), 10)
    report = load_pretrained(model, str(tmp_path / "resnet18.pth"), {"name": "resnet18"}, (3, 64, 64),
                             [str(i) for i in range(10)])
    assert sorted(report["replaced"]) == ["fc.bias", "fc.weight"] and report["unused"] == []
    assert report["left_new"] == [] and len(report["loaded"]) == len(theirs) - 2
    now = model.state_dict()
    for key, tensor in theirs.items():
        ours = key.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.bn.")
        if not key.startswith("fc."):
            assert torch.equal(now[ours], tensor), key


TORCHVISION_FORMS = [("alexnet", "alexnet", {}), ("vgg11", "vgg11", {}), ("vgg16", "vgg16_bn", {"batch_norm": True}),
                     ("resnet50", "resnet50", {}), ("googlenet", "googlenet", {}), ("densenet121", "densenet121", {})]


@pytest.mark.parametrize("name,tv_name,options", TORCHVISION_FORMS, ids=[f[1] for f in TORCHVISION_FORMS])
def test_every_torchvision_name_maps_onto_cvtrain_names(name, tv_name, options):
    """Shapes only (the meta device: nothing allocated): every tensor of torchvision's model has a cvtrain name of
    the same shape (googlenet's auxiliary classifiers aside: cvtrain has none)."""
    with torch.device("meta"):
        extra = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
        theirs = torchvision.models.get_model(tv_name, **extra).state_dict()
        model = create_model(name, (3, 224, 224), 1000, variant="imagenet", **options)
    ours, rename = model.state_dict(), torchvision_renamer(name, model)
    if name == "densenet121":  # the weight files' old names (denselayer1.norm.1.weight), as torchvision loads them
        theirs = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.") if "denselayer" in k else k: v
                  for k, v in theirs.items()}
    mapped = {rename(k): v for k, v in theirs.items() if not k.startswith(("aux1.", "aux2."))}
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)


def test_torchvision_offline_names_the_file_to_place(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    model = build_model({"name": "resnet18"}, (3, 64, 64), 10)
    file = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UserError, match="cannot download ResNet18_Weights.IMAGENET1K_V1") as err:
        load_pretrained(model, "torchvision", {"name": "resnet18"}, (3, 64, 64))
    assert str(file) in str(err.value) and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(err.value)
    with pytest.raises(UserError, match="torchvision has no weights for model=lenet"):
        load_pretrained(build_model({"name": "lenet"}, (3, 32, 32), 10), "torchvision", {"name": "lenet"},
                        (3, 32, 32))


def test_torchvision_weights_in_the_hub_cache_load_without_a_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    file = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    file.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), file)
    model = build_model({"name": "resnet18"}, (3, 64, 64), 10)
    report = load_pretrained(model, "torchvision", {"name": "resnet18"}, (3, 64, 64))
    assert sorted(report["replaced"]) == ["fc.bias", "fc.weight"] and len(report["loaded"]) == 120


# --- model.freeze -------------------------------------------------------------------------------------------

def test_frozen_weights_and_batch_norm_statistics_do_not_change_while_the_head_learns(compose_config):
    model = resnet20(classes=5)
    assert model_head(model)[0] == "fc"
    report = freeze(model, "backbone")
    assert report["trainable"] == 64 * 5 + 5 and report["batch_norms"] == 19
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(compose_config(["optim=momentum"]).optim, model)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    torch.manual_seed(0)
    for epoch in range(2):
        model.train()  # what each epoch of the loop does: the frozen BatchNorm layers stay in eval mode
        assert not model.bn1.training and not model.layer3[2].bn2.training and model.training
        for _ in range(3):
            x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.eval()
    after = model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == ["fc.bias", "fc.weight"]  # running_mean/var and num_batches_tracked included


def test_freeze_prefixes_and_their_errors():
    model = resnet20()
    report = freeze(model, ["conv1", "layer1"])
    assert report["frozen"][0] == "conv1.weight" and all(n.startswith(("conv1", "layer1")) for n in report["frozen"])
    assert model.layer2[0].conv1.weight.requires_grad and not model.layer1[2].bn2.weight.requires_grad
    with pytest.raises(UserError, match="layer9 names no module of the model; its top-level modules are conv1, bn1, "
                                        "relu, layer1, layer2, layer3, avgpool, fc"):
        freeze(resnet20(), ["layer9"])
    with pytest.raises(UserError, match="freezes every parameter"):
        freeze(resnet20(), ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"])


# --- end to end: pretrain, then fine-tune a frozen backbone on other classes ---------------------------------

def test_a_run_with_pretrained_and_a_frozen_backbone(pretrained_run, compose_config, tmp_path):
    cfg = compose_config([*SYNTHETIC, "model=resnet20", f"model.pretrained={pretrained_run}",
                          "model.freeze=backbone", "data.classes=[5,6,7,8,9]", "data.max_per_class=8",
                          "optim.head_lr_mult=10", "trainer.epochs=2"])
    check_config(cfg)
    summary = train(cfg, tmp_path)
    assert summary["status"] == "completed"
    saved, tuned = checkpoint_model(pretrained_run), checkpoint_model(tmp_path, "last")
    assert tuned["fc.weight"].shape == (5, 64)
    assert all(torch.equal(tuned[k], saved[k]) for k in tuned if not k.startswith("fc.")), \
        "frozen weights or BatchNorm statistics changed"
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["data"]["classes"] == [f"class{i}" for i in range(5, 10)]


# --- optim.head_lr_mult ---------------------------------------------------------------------------------------

def test_head_lr_mult_gives_the_head_its_own_groups(compose_config):
    model = resnet20()
    head = [id(model.fc.weight), id(model.fc.bias)]
    cfg = compose_config(["optim=sgd", "optim.head_lr_mult=10"])
    groups = build_optimizer(cfg.optim, model).param_groups
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(1.0)]
    assert [id(p) for p in groups[1]["params"]] == head and id(model.fc.weight) not in map(id, groups[0]["params"])
    cfg = compose_config(["optim=sgd", "optim.head_lr_mult=0.5", "optim.decay_norm_and_bias=false"])
    groups = build_optimizer(cfg.optim, model).param_groups
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (0.1, 5e-4, 19), (0.1, 0.0, 38), (0.05, 5e-4, 1), (0.05, 0.0, 1)]
    cfg = compose_config(["optim=sgd", "optim.head_lr_mult=2", "++optim.norm_and_bias_lr_scale=64"])
    groups = build_optimizer(cfg.optim, model).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 6.4, 0.2, 12.8])  # weights, scaled, head weight, head bias
    schedule = build_scheduler(compose_config(["sched=cosine"]).sched, build_optimizer(cfg.optim, model), 4, 10)
    for _ in range(13):
        schedule.step_batch()
    lrs = [g["lr"] for g in schedule.optimizer.param_groups]
    assert lrs[2] / lrs[0] == pytest.approx(2) and lrs[3] / lrs[1] == pytest.approx(2)


def test_head_lr_mult_1_leaves_the_groups_as_they_were(compose_config):
    model = resnet20()
    for overrides in ([], ["optim.decay_norm_and_bias=false"], ["++optim.norm_and_bias_lr_scale=64"]):
        cfg = compose_config(["optim=sgd", *overrides])
        built = build_optimizer(cfg.optim, model).param_groups
        plain = param_groups(model, cfg.optim.decay_norm_and_bias, cfg.optim.get("norm_and_bias_lr_scale", 1.0),
                             lr=0.1, weight_decay=5e-4)
        assert [[id(p) for p in g["params"]] for g in built] == [[id(p) for p in g["params"]] for g in plain]
    with pytest.raises(UserError, match="optim.head_lr_mult=0: the lr factor of the head must be a positive number"):
        check_config(compose_config(["optim.head_lr_mult=0"]))


# --- the config: every trained model takes the keys, kNN refuses them ------------------------------------------

@pytest.mark.parametrize("model", ["lenet", "mlp", "resnet18", "vgg11", "densenet121", "airbench", "svm"])
def test_every_trained_model_takes_pretrained_and_freeze(compose_config, model):
    check_config(compose_config([f"model={model}", "model.pretrained=outputs/run", "model.freeze=backbone"]))
    check_config(compose_config([f"model={model}", "model.freeze=[a,b.c]"]))
    if model in ("resnet18", "vgg11", "densenet121"):
        check_config(compose_config([f"model={model}", "model.pretrained=torchvision"]))
    else:  # found before any data is loaded
        with pytest.raises(UserError, match=f"torchvision has no weights for model={model.replace('svm', 'linear')}"):
            check_config(compose_config([f"model={model}", "model.pretrained=torchvision"]))


def test_knn_refuses_pretrained_and_freeze(compose_config):
    with pytest.raises(UserError, match="model=knn is fitted .* model.pretrained and model.freeze do not apply"):
        check_config(compose_config(["model=knn", "+model.pretrained=run"]))
    with pytest.raises(UserError, match="model.freeze=3"):
        check_config(compose_config(["model=lenet", "model.freeze=3"]))


# --- data.classes, data.max_per_class ----------------------------------------------------------------------

def test_a_class_subset_relabels_and_keeps_the_whole_validation_split(compose_config):
    base = ["data=synthetic", "data.num_samples=300", "data.image_size=8"]
    full = load_data(compose_config(base).data)
    part = load_data(compose_config([*base, "data.classes=[7,2]", "data.max_per_class=5"]).data)
    assert part.classes == ["class7", "class2"] and part.num_classes == 2
    assert part.train.labels.bincount().tolist() == [5, 5]
    for new, old in ((0, 7), (1, 2)):
        assert torch.equal(part.val.images[part.val.labels == new], full.val.images[full.val.labels == old])
        chosen = part.train.images[part.train.labels == new]
        pool = full.train.images[full.train.labels == old]
        assert all((pool == image).flatten(1).all(1).any() for image in chosen)  # from the class's training images
    by_name = load_data(compose_config([*base, "data.classes=[class7,class2]", "data.max_per_class=5"]).data)
    assert torch.equal(by_name.train.images, part.train.images) and torch.equal(by_name.val.labels, part.val.labels)
    capped = load_data(compose_config([*base, "data.max_per_class=4"]).data)
    assert capped.train.labels.bincount().tolist() == [4] * 10 and len(capped.val) == len(full.val)
    assert capped.test is not None and len(capped.test) == len(full.test)


def test_bad_subsets_are_clear_errors(compose_config):
    base = ["data=synthetic", "data.num_samples=100", "data.image_size=8"]
    with pytest.raises(UserError, match="'cat' is no class of this data; its classes are class0, class1"):
        load_data(compose_config([*base, "data.classes=[cat]"]).data)
    with pytest.raises(UserError, match="12 is no class index of this data: it has 10 classes, 0..9"):
        load_data(compose_config([*base, "data.classes=[1,12]"]).data)
    with pytest.raises(UserError, match="names a class twice"):
        load_data(compose_config([*base, "data.classes=[1,class1]"]).data)
    with pytest.raises(UserError, match="data.max_per_class=0: training images per class"):
        check_config(compose_config([*base, "data.max_per_class=0"]))
    with pytest.raises(UserError, match="data.classes=\\[\\]: the classes to keep"):
        check_config(compose_config([*base, "data.classes=[]"]))
