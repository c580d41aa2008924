"""task=predict (README "Using a trained model"): image files of any size and mode through a checkpoint. A folder
of PNGs and JPGs of mixed sizes written from training images gets those images' classes; a corrupt file is
named and skipped; grayscale and RGB files are converted to the training channels."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvtrain import UserError
from cvtrain.data import load_data
from cvtrain.tasks import predict
from cvtrain.trained import load_trained

DATA = ["data=synthetic", "data.channels=3", "data.image_size=16", "data.num_classes=4", "data.num_samples=240",
        "data.num_test=0", "data.noise=0.3", "data.batch_size=32"]
TRAIN = [*DATA, "model=lenet", "optim.lr=3e-3", "trainer.epochs=3", "trainer.viz=false", "trainer.progress=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, run_cli, run_dir_of):
    cwd = tmp_path_factory.mktemp("predict")
    proc = run_cli(TRAIN, cwd)
    assert proc.returncode == 0, proc.stdout
    return run_dir_of(cwd)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def folder(run_dir, compose_config, tmp_path_factory):
    """Training images the model gets right most confidently, as files: {file name: class}, in a folder with a
    sub-folder, PNGs and JPGs, some enlarged, one corrupt file and one text file."""
    data = load_data(compose_config(DATA).data)
    trained = load_trained(run_dir)
    images, labels = data.train.images[:80], data.train.labels[:80]
    probs = predict.probabilities(trained, images)
    right = [i for i in range(80) if probs[i].argmax() == labels[i]]
    best = {c: sorted((i for i in right if labels[i] == c), key=lambda i: -probs[i].max().item()) for c in range(4)}
    picked = [best[c][0] for c in range(4)] + [best[c][1] for c in range(4)]  # the two most confident per class
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    expected = {}
    for n, i in enumerate(picked):
        img = _pil(images[i])
        name = ["a.png", "b.jpg", "sub/c.png", "sub/d.jpg", "e.png", "f.jpg", "g.png", "h.png"][n]
        if n in (2, 4):  # enlarged 3x and 2x (nearest): resized back to 16x16
            img = img.resize((48, 48) if n == 2 else (32, 32), Image.NEAREST)
        if n == 5:
            img = img.resize((40, 40), Image.BICUBIC)
        img.save(root / name, quality=95) if name.endswith(".jpg") else img.save(root / name)
        expected[name] = trained.classes[labels[i]]
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (root / "notes.txt").write_text("not an image: left out of a folder")
    return root, expected


def _rows(csv_file):
    with open(csv_file, newline="") as f:
        return list(csv.reader(f))


def test_a_folder_of_mixed_files_gets_the_training_classes(run_dir, folder, run_cli, tmp_path):
    root, expected = folder
    proc = run_cli(["task=predict", f"checkpoint={run_dir}", f"inputs={root}"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    (pred_dir,) = (tmp_path / "outputs").glob("*/*_predict")
    header, *rows = _rows(pred_dir / "predictions.csv")
    assert header == ["file", "class", "probability", "top2_class", "top2_probability", "top3_class",
                      "top3_probability", "top4_class", "top4_probability"]  # top-k: min(5, 4 classes)
    got = {str(Path(r[0]).relative_to(root)): r for r in rows}  # inputs= was absolute: so are the files
    assert set(got) == set(expected)  # the corrupt file skipped, the text file never read
    for name, cls in expected.items():
        row = got[name]
        assert row[1] == cls, (name, row)
        probs = [float(row[i]) for i in range(2, len(row), 2)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)
    assert "corrupt.png" in proc.stdout and "skipped 1 unreadable" in proc.stdout
    assert "resized" in proc.stdout  # the enlarged ones, in one note
    assert "predicted 8 of 9 file(s)" in proc.stdout


def test_globs_lists_and_single_files(folder, compose_config):
    root, expected = folder
    assert len(predict.find_images(str(root))) == 9  # 8 images and the corrupt .png
    assert sorted(p.name for p in predict.find_images(f"{root}/**/*.jpg")) == ["b.jpg", "d.jpg", "f.jpg"]
    assert [p.name for p in predict.find_images([str(root / "a.png"), str(root / "sub")])] == ["a.png", "c.png", "d.jpg"]
    as_typed = compose_config(["task=predict", f"inputs=[{root / 'b.jpg'},{root / 'a.png'},{root / 'b.jpg'}]"]).inputs
    assert [p.name for p in predict.find_images(as_typed)] == ["b.jpg", "a.png"]  # in order, once each
    with pytest.raises(UserError, match="no such file or folder, and no file matches it as a glob"):
        predict.find_images(str(root / "nothing*.png"))


def test_grayscale_and_rgb_files_are_converted_to_the_training_channels(tmp_path):
    rgb = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    _pil(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[0].numpy(), mode="L").save(tmp_path / "gray.png")
    notes = predict.Decoded()
    gray = predict.decode(tmp_path / "rgb.png", (1, 8, 8), notes)  # RGB file, 1-channel model
    assert gray.shape == (1, 8, 8)
    assert torch.equal(gray[0], torch.from_numpy(np.array(_pil(rgb).convert("L"))))
    color = predict.decode(tmp_path / "gray.png", (3, 8, 8), notes)  # gray file, RGB model
    assert color.shape == (3, 8, 8) and torch.equal(color[0], rgb[0]) and torch.equal(color[1], color[2])
    big = predict.decode(tmp_path / "rgb.png", (3, 4, 4), notes)  # resized to the training geometry
    assert big.shape == (3, 4, 4)
    assert notes.converted == {"RGB -> gray": 1, "gray -> RGB": 1} and notes.resized == 1 and not notes.bad


def test_tta_and_top_k_in_process(run_dir, folder, compose_config, tmp_path):
    root, expected = folder
    predict.run(compose_config(["task=predict", f"checkpoint={run_dir}", f"inputs={root / 'a.png'}",
                                "trainer.tta=flip", "task.top_k=2"]), tmp_path)
    header, row = _rows(tmp_path / "predictions.csv")
    assert header == ["file", "class", "probability", "top2_class", "top2_probability"]
    assert row[1] == expected["a.png"]
    with pytest.raises(UserError, match="task=predict needs inputs="):
        predict.run(compose_config(["task=predict", f"checkpoint={run_dir}"]), tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
