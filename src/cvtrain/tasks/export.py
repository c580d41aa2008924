"""task=export: a trained model as files other programs run, from its checkpoint alone, each checked
against PyTorch.

    python -m cvtrain task=export checkpoint=<run dir or .pt file> [task.input=float|uint8]

The exported model is cvtrain.trained.Deployable: the checkpoint's preprocessing (data.preprocess, its
statistics as constants) folded in front of the network, so it takes raw images and returns scores:

    input   "images": (batch, C, H, W) in the training geometry and channels (RGB or gray), the batch size
            free (a dynamic axis); task.input=float (default): float32 on [0, 1]; task.input=uint8: 0-255
    output  "scores": (batch, classes) float32 logits (kNN: log vote fractions); softmax -> probabilities;
            the class names are in export.json and in the ONNX file's metadata ("classes", JSON)

Formats (task.formats):
    onnx         model.onnx, through torch.export and the installed torch.onnx exporter (the dynamo-based
                 one: it needs onnxscript) at its default opset unless task.opset; one file (weights inside).
                 Needs the extra: pip install -e ".[export]" (onnx, onnxruntime, onnxscript); checked with
                 onnxruntime on the CPU
    torchscript  model.torchscript.pt (torch.jit.trace; torch.jit.load in C++ or Python). TorchScript is
                 deprecated in PyTorch 2.10+ (it warns; the warning is silenced here) but still the format
                 LibTorch programs load; where a PyTorch has dropped torch.jit it is skipped with a note
    pt2          model.pt2, the torch.export program (torch.export.load(...).module()): the format that
                 replaces TorchScript, and what the ONNX file is made from

Each file is loaded back and run on task.images validation images of the checkpoint's data (random images
with a warning when that data cannot be loaded here) beside the PyTorch module: the largest absolute
difference of the scores and the top-1 agreement are printed and written to export.json with the input and
output description, the opset and the files.
"""
import importlib
import json
import logging
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.config import DataConfig
from cvtrain.data import load_data
from cvtrain.table import format_table
from cvtrain.trained import INPUTS, Deployable, TrainedModel, load_trained, require_checkpoint

log = logging.getLogger("cvtrain")
FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # the extra [export]
QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")  # their INFO lines are the exporter's progress
EXAMPLE_BATCH = 2  # the batch the model is traced with (the batch axis stays free)


def require_onnx():
    """onnxruntime, once onnx, onnxruntime and onnxscript are importable; else a UserError naming the extra."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"task=export to ONNX needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        "not installed: pip install -e \".[export]\" (in cvtrain's checkout; or pip install onnx "
                        "onnxruntime onnxscript); or leave ONNX out: task.formats=[torchscript,pt2]")
    return importlib.import_module("onnxruntime")  # an optional extra: imported here, when asked for


def validation_images(trained: TrainedModel, count: int) -> tuple:
    """(uint8 images (count, C, H, W) from the checkpoint's validation split, where they come from); random
    images with a warning when the checkpoint's data cannot be loaded here."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(DataConfig),
                               {k: v for k, v in OmegaConf.to_container(trained.config.data, resolve=True).items()
                                if k in DataConfig.__dataclass_fields__})
        data = load_data(node, fit=False)  # uint8 images: the checkpoint's preprocessing is folded in
        if tuple(data.shape) == tuple(trained.shape) and len(data.val):
            return data.val.images[:count], f"{len(data.val.images[:count])} validation images of data={node.name}"
    except UserError as err:
        log.warning("the checkpoint's data cannot be loaded here (%s); checking on random images", err)
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (count, *trained.shape), dtype=torch.uint8, generator=generator),
            f"{count} random images (the checkpoint's data is not here)")


def compare(reference: torch.Tensor, out: torch.Tensor) -> dict:
    """max_abs_diff (equal infinities count as 0: kNN's log(0) votes) and top1_agreement of two score batches."""
    out = torch.as_tensor(out).float()
    diff = torch.where(out == reference, torch.zeros_like(reference), (out - reference).abs())
    return {"max_abs_diff": diff.max().item() if diff.numel() else 0.0,
            "top1_agreement": (out.argmax(1) == reference.argmax(1)).double().mean().item()}


def run(cfg, run_dir: Path) -> dict:
    """The task: write the chosen formats, check each against PyTorch, write export.json; returns its content."""
    run_dir = Path(run_dir)
    path = require_checkpoint(cfg)
    formats = list(cfg.task.formats) if cfg.task.formats is not None else []
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"task.formats={formats}: choose any of {', '.join(FORMATS)} (like task.formats=[onnx,pt2])")
    if cfg.task.input not in INPUTS:
        raise UserError(f"task.input={cfg.task.input} is unknown; choose float (images on [0, 1]) or uint8 (0-255)")
    ort = require_onnx() if "onnx" in formats else None
    trained = load_trained(path, "cpu")  # exported from the CPU: the files run anywhere
    if "onnx" in formats and getattr(trained.model, "distance", None) == "l1":
        raise UserError("a kNN with model.distance=l1 does not export to ONNX (the exporter has no translation of "
                        "torch.cdist); export it with task.formats=[torchscript,pt2], or fit model.distance=l2")
    module = Deployable(trained, cfg.task.input).eval()
    log.info("export: %s | input %s", trained.describe(), cfg.task.input)
    images, source = validation_images(trained, int(cfg.task.images))
    x = images if cfg.task.input == "uint8" else images.float().div(255)
    example = x[:EXAMPLE_BATCH] if len(x) >= EXAMPLE_BATCH else torch.zeros((EXAMPLE_BATCH, *trained.shape), dtype=x.dtype)
    with torch.inference_mode():
        reference = module(x).float()
    run_dir.mkdir(parents=True, exist_ok=True)
    results, notes = {}, []
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    if "pt2" in formats:
        results["pt2"] = _pt2(program, x, reference, run_dir)
    if "onnx" in formats:
        results["onnx"] = _onnx(program, example, x, reference, run_dir, trained, cfg, ort)
    if "torchscript" in formats:
        if hasattr(torch, "jit") and hasattr(torch.jit, "trace"):
            results["torchscript"] = _torchscript(module, example, x, reference, run_dir)
        else:
            notes.append("this PyTorch has no torch.jit: no TorchScript file (model.pt2 replaces it)")
    c, h, w = trained.shape
    summary = {
        "checkpoint": str(path), "model": trained.name, "classes": list(trained.classes),
        "input": {"name": "images", "shape": ["batch", c, h, w],
                  "dtype": "uint8" if cfg.task.input == "uint8" else "float32",
                  "range": "0-255" if cfg.task.input == "uint8" else "[0, 1]",
                  "channels": "gray" if c == 1 else "RGB" if c == 3 else f"{c} channels",
                  "preprocessing": f"folded in: data.preprocess={trained.preprocess.method}"},
        "output": {"name": "scores", "shape": ["batch", len(trained.classes)],
                   "meaning": "log vote fractions (softmax: the vote fractions)" if trained.kind == "fitted"
                   else "logits (softmax: class probabilities)"},
        "validation": source, "formats": results, "notes": notes, "torch": torch.__version__}
    (run_dir / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [[name, r["file"], f"{r['size_bytes'] / 1e6:.2f} MB", f"{r['max_abs_diff']:.2e}",
             f"{100 * r['top1_agreement']:.2f}%", f"{r['export_s']:.1f} s"] for name, r in results.items()]
    log.info("checked on %s beside PyTorch:\n%s", source,
             format_table(["format", "file", "size", "max abs diff", "top-1 agreement", "time"], rows, right=(2, 3, 4, 5)))
    for note in notes:
        log.info("note: %s", note)
    if "onnx" in results:
        log.info("ONNX opset %d; input 'images' %s (batch, %d, %d, %d) %s; output 'scores' (batch, %d)",
                 results["onnx"]["opset"], summary["input"]["dtype"], c, h, w, summary["input"]["range"],
                 len(trained.classes))
    log.info("wrote %s and export.json in %s", ", ".join(r["file"] for r in results.values()), run_dir)
    return summary


def _result(file: Path, started: float, reference: torch.Tensor, out) -> dict:
    return {"file": file.name, "size_bytes": file.stat().st_size, "export_s": round(time.perf_counter() - started, 2),
            **compare(reference, out)}


def _pt2(program, x, reference, run_dir: Path) -> dict:
    started = time.perf_counter()
    file = run_dir / FORMATS["pt2"]
    torch.export.save(program, file)
    loaded = torch.export.load(file).module()
    with torch.inference_mode():
        out = loaded(x)
    return _result(file, started, reference, out)


def _onnx(program, example, x, reference, run_dir: Path, trained: TrainedModel, cfg, ort) -> dict:
    started = time.perf_counter()
    file = run_dir / FORMATS["onnx"]
    opset = cfg.task.opset
    quiet = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the exporter's passes log every step at INFO
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, verbose=False,
                                             input_names=["images"],
                                             output_names=["scores"], opset_version=int(opset) if opset else None)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    model = onnx_program.model
    model.metadata_props.update({"classes": json.dumps(list(trained.classes)), "input": cfg.task.input,
                                 "preprocessing": trained.preprocess.method, "producer": "cvtrain task=export"})
    onnx_program.save(str(file))
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    out = session.run(["scores"], {"images": x.numpy()})[0]
    opset_used = next((v for k, v in model.opset_imports.items() if k in ("", "ai.onnx")), None)
    return {**_result(file, started, reference, torch.from_numpy(out)), "opset": opset_used}


def _torchscript(module, example, x, reference, run_dir: Path) -> dict:
    started = time.perf_counter()
    file = run_dir / FORMATS["torchscript"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated (FutureWarning); still what LibTorch loads
        traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(file))
        loaded = torch.jit.load(str(file))
    with torch.inference_mode():
        out = loaded(x)
    return _result(file, started, reference, out)
