"""task=export (README "Using a trained model"): ONNX, TorchScript and torch.export files with the preprocessing
folded in, each loaded back and run beside PyTorch. LeNet (a trained run, via the command line) and ResNet-20
agree: top-1 identical, max abs difference < 1e-4, in onnxruntime, TorchScript and the torch.export program.
Every model of the zoo exports (`pytest -m slow`); without the [export] extra, ONNX is a clear error."""
import json
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.checkpoint import rng_state, save_checkpoint
from cvtrain.data import load_data
from cvtrain.models import build_model, list_models
from cvtrain.tasks import export
from cvtrain.trained import Deployable, fitted_checkpoint, load_trained

ort = pytest.importorskip("onnxruntime", reason="the [export] extra (onnx, onnxruntime, onnxscript)")
TOLERANCE = 1e-4
FORMATS = ("onnx", "torchscript", "pt2")


def make_checkpoint(compose_config, folder, model: str, shape=(3, 16, 16), classes: int = 4, extra=()):
    """A checkpoint as training writes one, of `model` (initialized, batch-norm statistics from a few batches
    of the synthetic data) on synthetic data of `shape`; returns its run dir."""
    c, h, _ = shape
    cfg = compose_config(["data=synthetic", f"data.channels={c}", f"data.image_size={h}", f"data.num_classes={classes}",
                          "data.num_samples=80", "data.num_test=0", f"model={model}", *extra])
    data = load_data(cfg.data)
    torch.manual_seed(0)
    net = build_model(cfg.model, data.shape, data.num_classes)
    x = data.preprocess(data.train.images.float().div(255))
    with torch.no_grad():  # running statistics that are not the identity
        net.train()
        for batch in x.split(32):
            net(batch)
    net.eval()
    checkpoint = {"model": net.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1, "step": 1,
                  "best_val_acc": 0.5, "best_epoch": 1, "rng": rng_state(),
                  "config": OmegaConf.to_container(cfg, resolve=True),
                  "data": {"mean": data.mean, "std": data.std, "preprocess": data.preprocess.state_dict(),
                           "classes": list(data.classes), "shape": list(data.shape)}}
    save_checkpoint(folder / "checkpoints" / "best.pt", checkpoint, durable=False)
    return folder


def run_export(compose_config, run_dir, out, *overrides) -> dict:
    summary = export.run(compose_config(["task=export", f"checkpoint={run_dir}", *overrides]), out)
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(summary))
    return summary


def assert_agrees(summary, formats=FORMATS):
    assert set(summary["formats"]) == set(formats)
    for name, result in summary["formats"].items():
        assert result["top1_agreement"] == 1.0, (name, result)
        assert result["max_abs_diff"] < TOLERANCE, (name, result)


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory, run_cli, run_dir_of):
    cwd = tmp_path_factory.mktemp("lenet")
    proc = run_cli(["data=synthetic", "data.channels=1", "data.image_size=16", "data.num_classes=4",
                    "data.num_samples=200", "data.num_test=0", "data.noise=0.3", "model=lenet", "trainer.epochs=2",
                    "trainer.viz=false", "trainer.progress=false"], cwd)
    assert proc.returncode == 0, proc.stdout
    return run_dir_of(cwd)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_trained_lenet_exports_and_agrees_with_pytorch(lenet_run, run_cli, tmp_path):
    proc = run_cli(["task=export", f"checkpoint={lenet_run}"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    (out,) = (tmp_path / "outputs").glob("*/*_export")
    summary = json.loads((out / "export.json").read_text())
    assert_agrees(summary)
    assert summary["validation"].startswith("20 validation images of data=synthetic")
    assert summary["input"] == {"name": "images", "shape": ["batch", 1, 16, 16], "dtype": "float32", "range": "[0, 1]",
                                "channels": "gray", "preprocessing": "folded in: data.preprocess=standardize"}
    assert summary["formats"]["onnx"]["opset"] >= 17
    for name in ("model.onnx", "model.torchscript.pt", "model.pt2"):
        assert (out / name).stat().st_size > 100_000
    assert not list(out.glob("*.data"))  # one ONNX file, the weights inside
    assert "max abs diff" in proc.stdout and "top-1 agreement" in proc.stdout and "onnx_ir" not in proc.stdout

    # the files on their own: raw [0, 1] images in, the training model's scores out, at any batch size
    trained = load_trained(lenet_run)
    images = torch.rand(5, 1, 16, 16)
    reference = trained.scores(images)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        got = session.run(["scores"], {"images": images[:batch].numpy()})[0]
        assert np.abs(got - reference[:batch].numpy()).max() < TOLERANCE
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == trained.classes and meta["input"] == "float"
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    assert (scripted(images) - reference).abs().max() < TOLERANCE
    program = torch.export.load(str(out / "model.pt2")).module()
    assert (program(images[:1]) - reference[:1]).abs().max() < TOLERANCE


def test_resnet20_exports_and_agrees_with_pytorch(compose_config, tmp_path):
    run_dir = make_checkpoint(compose_config, tmp_path / "run", "resnet20", shape=(3, 16, 16), classes=10)
    assert_agrees(run_export(compose_config, run_dir, tmp_path / "out"))


def test_uint8_input_and_whitening_are_folded_in(compose_config, tmp_path):
    run_dir = make_checkpoint(compose_config, tmp_path / "run", "linear", shape=(3, 8, 8),
                              extra=["data.preprocess=zca_whiten"])
    summary = run_export(compose_config, run_dir, tmp_path / "out", "task.input=uint8", "task.formats=[onnx,pt2]")
    assert_agrees(summary, ("onnx", "pt2"))
    assert summary["input"]["dtype"] == "uint8" and summary["input"]["range"] == "0-255"
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    trained = load_trained(run_dir)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    got = session.run(["scores"], {"images": images.numpy()})[0]
    assert np.abs(got - trained.scores(images.float() / 255).numpy()).max() < TOLERANCE


def test_a_knn_exports_its_vote(compose_config, tmp_path):
    cfg = compose_config(["data=synthetic", "data.channels=1", "data.image_size=8", "data.num_classes=3",
                          "data.num_samples=90", "data.num_test=0", "model=knn", "model.k=3"])
    data = load_data(cfg.data)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt",
                    fitted_checkpoint(data.train.images, data.train.labels, OmegaConf.to_container(cfg, resolve=True),
                                      data, 1.0), durable=False)
    summary = run_export(compose_config, tmp_path / "run", tmp_path / "out")
    assert_agrees(summary)
    assert summary["output"]["meaning"].startswith("log vote fractions")


def test_without_the_extra_onnx_is_a_clear_error_and_the_rest_still_exports(compose_config, tmp_path, monkeypatch):
    run_dir = make_checkpoint(compose_config, tmp_path / "run", "mlp", shape=(1, 8, 8))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(UserError, match=r'needs onnxruntime, which is not installed: pip install -e "\.\[export\]"'):
        run_export(compose_config, run_dir, tmp_path / "out")
    summary = run_export(compose_config, run_dir, tmp_path / "out", "task.formats=[torchscript,pt2]")
    assert_agrees(summary, ("torchscript", "pt2"))


def test_bad_export_options_are_clear_errors(compose_config, tmp_path):
    run_dir = make_checkpoint(compose_config, tmp_path / "run", "linear", shape=(1, 4, 4))
    with pytest.raises(UserError, match="task.formats=\\['tflite'\\]: choose any of onnx, torchscript, pt2"):
        run_export(compose_config, run_dir, tmp_path / "out", "task.formats=[tflite]")
    with pytest.raises(UserError, match="task.input=float16 is unknown"):
        run_export(compose_config, run_dir, tmp_path / "out", "task.input=float16")
    with pytest.raises(UserError, match="task.input=x is unknown"):
        Deployable(load_trained(run_dir), "x")


SMALL = {"alexnet": (3, 32, 32), "googlenet": (3, 32, 32), "densenet121": (3, 32, 32), "airbench": (3, 32, 32)}


@pytest.mark.slow
@pytest.mark.parametrize("model", [m for m in list_models("trained") if m not in ("lenet", "resnet20")])
def test_every_zoo_model_exports(model, compose_config, tmp_path):
    run_dir = make_checkpoint(compose_config, tmp_path / "run", model, shape=SMALL.get(model, (3, 16, 16)), classes=10)
    assert_agrees(run_export(compose_config, run_dir, tmp_path / "out", "task.images=8"))
