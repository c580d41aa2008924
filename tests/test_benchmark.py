"""scripts/benchmark.py: the whole benchmark in --quick mode (does it run and write every row, not the numbers),
and its helpers, the CUDA-only parts included (airbench's data files, the plain ResNet-20 recipe), on the CPU."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cvtrain.data import DataBundle, Split

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cvtrain_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_split(n, seed=0, shape=(3, 32, 32)):
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen), torch.arange(n) % 10)


# --- the quick run, as the test suite runs it -------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("bench")
    out = cwd / "out" / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "CVTRAIN_CIFAR_ROOT"}  # generated JPGs, not a CIFAR subset
    env.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return SimpleNamespace(output=proc.stdout, result=json.loads(out.read_text()), cwd=cwd)


def rows_of(result, section, device=None):
    return [r for r in result["rows"] if r["section"] == section and device in (None, r["device"])]


def test_quick_run_writes_every_section(quick_run):
    rows = quick_run.result["rows"]
    devices = 2 if torch.cuda.is_available() else 1
    assert [r["section"] for r in rows][:4 * devices + 5] == \
        ["overhead"] * 2 * devices + ["augment"] * devices + ["pipeline"] * devices + ["disk"] * 4 + ["knn"]
    assert {r["section"] for r in rows} == {"overhead", "augment", "pipeline", "disk", "knn", "speedrun", "resnet20"}
    augment = next(r for r in rows if r["section"] == "augment")
    assert augment["none_images_per_s"] > 0 and augment["cifar_images_per_s"] > 0 and augment["ratio_value"] > 0
    assert not any(r["failed"] for r in rows)
    assert quick_run.result["meta"]["quick"] is True
    assert "| section" in quick_run.output  # the table
    # nothing lands in the working directory but the JSON asked for (run dirs, caches: a temporary folder)
    assert sorted(p.relative_to(quick_run.cwd).as_posix() for p in quick_run.cwd.rglob("*")) == ["out", "out/bench.json"]


def test_quick_overhead_rows(quick_run):
    rows = rows_of(quick_run.result, "overhead", "cpu")
    assert [(r["device"], r["model"]) for r in rows] == [("cpu", "lenet"), ("cpu", "resnet20")]
    for r in rows:
        assert r["cvtrain_images_per_s"] > 0 and r["plain_images_per_s"] > 0
        assert r["overhead_ratio"] == pytest.approx(r["plain_images_per_s"] / r["cvtrain_images_per_s"], rel=1e-3)
        assert r["overhead_ratio_best"] > 0 and r["steps"] >= 1
        assert r["images"] > 0 and len(r["cvtrain_rounds"]) == len(r["plain_rounds"]) == r["rounds"] == 1
    assert rows[1]["images"] == 128  # --quick's ResNet-20 subset


def test_quick_pipeline_row(quick_run):
    (r,) = rows_of(quick_run.result, "pipeline", "cpu")
    assert r["cvtrain_images_per_s"] > 0 and r["dataloader_images_per_s"] > 0
    assert r["speedup"] == pytest.approx(r["cvtrain_images_per_s"] / r["dataloader_images_per_s"], rel=1e-2)
    assert r["decode_included"] is False and r["first_load_decoded"] is True  # a fresh cache: a real decode
    assert r["first_load_s"] > 0 and r["cached_load_s"] >= 0
    assert r["images"] == r["dataloader_images"]  # the same training split on both sides
    assert r["workers"] == os.cpu_count()
    assert "decode" in r["note"]


def test_quick_disk_rows(quick_run):
    rows = rows_of(quick_run.result, "disk", "cpu")
    workers = os.cpu_count()
    assert [r["name"] for r in rows] == [f"mapped ({workers} workers) vs in memory", "mapped (in-process) vs in memory",
                                         "mapped vs ImageFolder", "cache build"]
    r = rows[0]
    for key in ("in_memory", "mapped", "mapped_in_process", "dataloader"):
        assert r[f"{key}_images_per_s"] > 0 and len(r[f"{key}_rounds"]) == r["rounds"] == 1
    assert r["workers"] == workers and r["batch_size"] == 512 and r["build_workers"] == 2
    assert r["build_s"] > 0 and r["cached_load_s"] >= 0 and r["cache_bytes"] >= r["build_images"] * 3 * 32 * 32
    assert r["images"] < r["build_images"] == 400  # the training split of the 400 generated JPGs, all decoded
    assert "mapped/DataLoader" in rows[2]["ratio"] and "img/s" in rows[3]["ours"]


def test_quick_knn_row(quick_run):
    (r,) = rows_of(quick_run.result, "knn", "cpu")
    assert r["cvtrain_s"] > 0
    pytest.importorskip("sklearn")
    assert r["sklearn_s"] > 0 and r["agreement"] == 1.0 and r["disagreements"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA --quick runs them (2 epochs each)")
def test_quick_cuda_sections_are_skipped_with_a_note_on_the_cpu(quick_run):
    for section in ("speedrun", "resnet20"):
        (r,) = rows_of(quick_run.result, section)
        assert r["skipped"] and "CUDA only" in r["note"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the quick run itself goes through these sections")
def test_cuda_sections_dry_run_on_the_cpu(bench, tmp_path, monkeypatch):
    """speedrun and resnet20 through their code paths (compose the presets, train, time to target, the plain
    ResNet-20 loop) on tiny data; cifar10_lenet stands in for the speedrun preset; airbench needs CUDA."""
    monkeypatch.delenv("CVTRAIN_CIFAR_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dry.json"
    assert bench.main(["--quick", "--quick-per-class", "20", "--presets-on-cpu", "--only", "speedrun,resnet20",
                       "--speedrun-preset", "cifar10_lenet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    ours, airbench, cv20, plain20 = rows
    assert ours["name"] == "cvtrain experiment=cifar10_lenet" and not ours["skipped"]
    assert len(ours["runs"]) == 1 and 0 <= ours["val_acc_mean"] <= 1 and ours["time_s_mean"] > 0
    assert len(ours["runs"][0]["epochs"]) == 2  # --quick: 2 epochs
    assert airbench["skipped"] and "airbench" in airbench["note"]
    assert plain20["epochs"] == 2 and plain20["time_to_target_s"] is None and "not reached" in plain20["peer"]
    if cv20["skipped"]:  # the preset is someone else's file: a note when it cannot be composed
        assert "cannot be composed" in cv20["note"]
    else:
        assert cv20["epochs"] == 2 and 0 <= cv20["best_val_acc"] <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dry.json"]


# --- options ------------------------------------------------------------------------------------------------

def test_parse_images_and_sections(bench):
    models = ["lenet", "resnet20"]
    assert bench.parse_images("lenet=0,resnet20=5000", models) == {"lenet": 0, "resnet20": 5000}
    assert bench.parse_images("300", models) == {"lenet": 300, "resnet20": 300}
    assert bench.parse_images("resnet20=64", models) == {"lenet": 0, "resnet20": 64}
    for bad in ("lenet=x", "lenet", "-5"):
        with pytest.raises(ValueError):
            bench.parse_images(bad, models)
    assert bench.parse_sections("knn,overhead") == ["overhead", "knn"]  # always in the benchmark's order
    with pytest.raises(ValueError, match="choose among"):
        bench.parse_sections("overhead,speed")


def test_parse_args(bench, monkeypatch, capsys):
    monkeypatch.delenv("CVTRAIN_CIFAR_ROOT", raising=False)
    args, overrides = bench.parse_args(["--only", "overhead,knn", "trainer.monitor_every=100"])
    assert args.sections == ["overhead", "knn"] and overrides == ["trainer.monitor_every=100"]
    assert args.cifar_root is None and args.images == bench.DEFAULT_IMAGES and args.rounds == 3 and args.seeds == 5
    args, _ = bench.parse_args(["--quick"])
    assert args.rounds == 1 and args.images == bench.QUICK_IMAGES
    monkeypatch.setenv("CVTRAIN_CIFAR_ROOT", "/somewhere")
    for bad in (["--only", "nope"], ["--rounds", "0"], ["--images", "lenet=a"], ["--bogus"], ["notanoverride"], []):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert "not a folder" in capsys.readouterr().err  # $CVTRAIN_CIFAR_ROOT is checked like --cifar-root


def test_cifar_root_may_name_the_class_folders(bench, tmp_path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    assert bench.cifar_imagefolder_root(tmp_path / "data", tmp_path / "w") == (tmp_path / "data").resolve()
    assert bench.cifar_imagefolder_root(tmp_path / "data" / "train", tmp_path / "w") == (tmp_path / "data").resolve()
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    root = bench.cifar_imagefolder_root(tmp_path / "classes", tmp_path / "w")
    assert (root / "train" / "cat").is_dir() and root.parent == tmp_path / "w"


def test_scaled_schedule_keeps_the_shape(bench):
    bench.register_configs()
    cfg = bench.compose_cfg(["model=resnet20", "sched=multistep", "sched.milestones=[91,137]", "trainer.epochs=182"])
    assert bench.scaled_schedule(cfg, 40) == ["trainer.epochs=40", "sched.milestones=[20,30]"]
    assert bench.scaled_schedule(cfg, 182) == ["trainer.epochs=182"]
    cosine = bench.compose_cfg(["sched=cosine", "trainer.epochs=10"])
    assert bench.scaled_schedule(cosine, 5) == ["trainer.epochs=5"]


def test_subset_is_fixed_and_ordered(bench):
    split = fake_split(50)
    a, b = bench.subset(split, 20), bench.subset(split, 20)
    assert len(a) == 20 and torch.equal(a.images, b.images)
    assert bench.subset(split, 0) is split and bench.subset(split, 80) is split


def test_time_to_target_and_metrics(bench, tmp_path):
    epochs = [(2.0, 0.5), (2.5, 0.9), (3.0, 0.92), (1.0, 0.95)]
    assert bench.time_to_target(epochs, 0.91) == (7.5, 3)
    assert bench.time_to_target(epochs, 0.99) == (None, None)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "epoch_time_s": t, "val_acc": a}) + "\n"
                                                    for i, (t, a) in enumerate(epochs)))
    assert bench.read_metrics(tmp_path) == epochs
    assert bench.read_metrics(tmp_path / "missing") == []


def test_mean_std_format(bench):
    assert bench.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert bench.mean_std([4.0]) == (4.0, 0.0) and bench.mean_std([]) == (None, None)
    assert bench.fmt_ms([0.9, 0.92], 100, "%") == "91.00 +- 1.41%"
    assert bench.fmt_s(12.345) == "12.35 s" and bench.fmt_s(0.0123) == "12.3 ms"


def test_given_data_bypasses_load_data_and_restores_it(bench):
    import cvtrain.tasks.train as train_module

    original = train_module.load_data
    bundle = object()
    with bench.given_data(bundle):
        assert train_module.load_data(None, "cpu", need_test=False) is bundle
    assert train_module.load_data is original


def test_missing_preset_is_a_note_not_a_crash(bench, tmp_path):
    bench.register_configs()
    ctx = SimpleNamespace(root=tmp_path, cache_dir=tmp_path / "cache", overrides=[])
    cfg, why = bench.compose_preset(ctx, "no_such_preset_here")
    assert cfg is None and "experiment=no_such_preset_here" in why
    cfg, why = bench.compose_preset(ctx, "cifar10_lenet", "trainer.seed=3")  # an existing preset composes
    assert why is None and cfg.trainer.seed == 3 and cfg.data.name == "imagefolder" and cfg.data.val_fraction == 0.1
    assert cfg.trainer.test is False


def test_explain_disagreement(bench):
    train_x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    text = bench.explain_disagreement(0, train_x, torch.tensor([0, 1, 1, 0]), torch.tensor([1.5]), 2, "l2", 1, 0)
    assert "cvtrain says 1, scikit-learn 0" in text and "votes of the 2 nearest [0, 2]" in text


# --- airbench's data (speedrun) -------------------------------------------------------------------------------

def test_write_airbench_data_format(bench, tmp_path):
    train, val = fake_split(20, 1), fake_split(10, 2)
    classes = [f"c{i}" for i in range(10)]
    folder = bench.write_airbench_data(train, val, classes, tmp_path / "cifar10")
    for name, split in (("train", train), ("test", val)):  # test.pt holds the validation split
        saved = torch.load(folder / f"{name}.pt", weights_only=True)
        assert set(saved) == {"images", "labels", "classes"}
        assert saved["images"].dtype == torch.uint8 and saved["images"].shape == (len(split), 32, 32, 3)  # HWC
        assert torch.equal(saved["images"].permute(0, 3, 1, 2), split.images)
        assert saved["labels"].dtype == torch.int64 and torch.equal(saved["labels"], split.labels)
        assert saved["classes"] == classes
    with pytest.raises(ValueError, match="32x32 RGB"):
        bench.write_airbench_data(fake_split(4, shape=(1, 28, 28)), val, classes, tmp_path / "x")


def test_airbench_reads_the_files(bench, tmp_path):
    airbench = pytest.importorskip("airbench")
    train, val = fake_split(20, 1), fake_split(10, 2)
    folder = bench.write_airbench_data(train, val, [f"c{i}" for i in range(10)], tmp_path / "cifar10")
    loader = airbench.CifarLoader(str(folder), train=True, batch_size=5, aug=dict(flip=True, translate=2),
                                  altflip=True, gpu="cpu")
    assert torch.allclose(loader.images.float(), train.images.float() / 255, atol=1e-3)
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 32, 32)
    assert torch.equal(airbench.CifarLoader(str(folder), train=False, gpu="cpu").labels, val.labels)


def test_import_airbench_says_how_to_install(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "airbench", None)  # import airbench -> ImportError
    module, why = bench.import_airbench()
    assert module is None and "pip install airbench==0.1.8" in why


# --- the plain ResNet-20 recipe (resnet20) ---------------------------------------------------------------------

def test_plain_resnet20_matches_cvtrain_resnet20_size(bench):
    from cvtrain.models import create_model

    plain = sum(p.numel() for p in bench.PlainResNet20(3, 10).parameters())
    ours = sum(p.numel() for p in create_model("resnet20", (3, 32, 32), 10).parameters())
    assert plain == ours == 269_722  # 0.27M, He et al. 2016 Table 6
    assert bench.PlainResNet20(3, 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_pad_crop_flip_cuts_shifted_windows(bench):
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = bench.pad_crop_flip(x, padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(2):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_plain_resnet20_run_on_cpu(bench):
    train, val = fake_split(64, 3), fake_split(20, 4)
    data = DataBundle(train, val, None, [str(c) for c in range(10)], torch.full((3,), 0.5), torch.full((3,), 0.25))
    lines = []
    result = bench.plain_resnet20_run(data, epochs=2, device="cpu", batch_size=32, log=lines.append)
    assert len(result["epochs"]) == 2 and len(lines) == 2
    assert all(t > 0 and 0 <= a <= 1 for t, a in result["epochs"])
    assert result["train_s"] == pytest.approx(sum(t for t, _ in result["epochs"]))
    assert result["best_val_acc"] >= result["final_val_acc"]
    result = bench.plain_resnet20_run(data, epochs=1, device="cpu", batch_size=32, milestones=[1],
                                      normalize="mean_image", log=None)
    assert len(result["epochs"]) == 1
    with pytest.raises(ValueError, match="channel or mean_image"):
        bench.plain_resnet20_run(data, epochs=1, device="cpu", normalize="other", log=None)


def test_a_failing_model_is_a_failed_row_and_the_others_still_run(bench, monkeypatch):
    def overhead_row(ctx, device, model, n):
        if model == "bad":
            raise RuntimeError("boom")
        return bench.row("overhead", device, model, images=n)

    monkeypatch.setattr(bench, "overhead_row", overhead_row)
    ctx = SimpleNamespace(args=SimpleNamespace(images="bad=5,lenet=7", models=["bad", "lenet"]),
                          devices=[torch.device("cpu")])
    bad, good = bench.section_overhead(ctx)
    assert bad["failed"] and "RuntimeError: boom" in bad["note"]
    assert not good["failed"] and good["images"] == 7


def test_airbench_cpu_without_airbench_names_the_install(tmp_path):
    """scripts/airbench_cpu.py (airbench94 itself on the CPU): without the package, an error naming the install."""
    if importlib.util.find_spec("airbench") is not None:
        pytest.skip("airbench is installed here")
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "airbench_cpu.py"), "--cifar-root", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode != 0 and "airbench is not importable" in proc.stdout
    assert "pip install airbench==0.1.8" in proc.stdout
