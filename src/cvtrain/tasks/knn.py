"""Fitting a fitted model (the registry's kind "fitted": kNN), the train task's path for it:
memorize the preprocessed training images, report the validation accuracy for every k of K_GRID
(the configured model.k is the run's result), optionally k-fold cross-validation on the training
split (model.cv_folds) and the test split (trainer.test). Writes the same run directory as a
training run: TensorBoard (knn/val_acc, knn/cv_acc against k), summary.json, and (trainer.checkpoint)
checkpoints/best.pt: the training images (uint8) and labels in place of weights, with the config, classes,
shape and preprocessing every checkpoint has, so task=evaluate / predict / export work from it alone
(cvtrain/trained.py rebuilds the classifier).
"""
import copy
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from cvtrain import UserError
from cvtrain.checkpoint import save_checkpoint
from cvtrain.data import load_data, stratified_split
from cvtrain.device import resolve_device
from cvtrain.models import build_model
from cvtrain.models.knn import KNNClassifier
from cvtrain.hparams import run_hparams
from cvtrain.monitor import RunLogger, write_summary
from cvtrain.table import format_table
from cvtrain.trained import fitted_checkpoint

log = logging.getLogger("cvtrain")
K_GRID = (1, 3, 5, 7, 10, 15, 20, 30, 50, 100)  # k values whose accuracy every run reports
AUTO_DISTANCES = ("l2", "l1")  # model.distance=auto tries these (ties: the first)


def accuracy_by_k(knn: KNNClassifier, x, y, ks) -> dict:
    """{k: accuracy of the k-NN vote on (x, y)} for every k in ks (one neighbour search for all)."""
    labels = knn.neighbours(x, max(ks))
    return {k: (knn.vote(labels, k) == y).float().mean().item() for k in ks if k <= labels.shape[1]}


def preprocessed(split, preprocess, device, chunk: int = 10_000):
    """(images through the fitted data.preprocess, labels), on `device`; converted in chunks."""
    preprocess = preprocess.to(device)
    x = torch.cat([preprocess(part.to(device).float().div_(255)) for part in split.images.split(chunk)])
    return x, split.labels.to(device)


def cross_validate(knn: KNNClassifier, x, y, num_classes: int, ks, folds: int, split_seed: int) -> dict:
    """{k: mean accuracy over `folds` folds}; each fold holds out 1/folds of every class, drawn anew."""
    accs = {k: [] for k in ks}
    for fold in range(folds):
        fit_idx, held_idx = stratified_split(y.cpu(), 1 / folds, seed=split_seed + fold)
        fit_idx, held_idx = fit_idx.to(x.device), held_idx.to(x.device)
        fold_knn = KNNClassifier(knn.k, knn.distance, knn.chunk_size).fit(x[fit_idx], y[fit_idx], num_classes)
        for k, acc in accuracy_by_k(fold_knn, x[held_idx], y[held_idx], ks).items():
            accs[k].append(acc)
    return {k: sum(v) / len(v) for k, v in accs.items() if v}


def run(cfg, run_dir: Path) -> float:
    """Fit, choose k on val (and by cross-validation), write the run dir; returns the val accuracy."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.trainer.device)
    start = time.perf_counter()
    data = load_data(cfg.data, device, need_test=cfg.trainer.test)
    cfg, auto = _without_auto(cfg)  # model.k=auto / model.distance=auto: chosen on val below
    knn = build_model(cfg.model, data.shape, data.num_classes)
    if "k" not in auto and knn.k > len(data.train):
        raise UserError(f"model.k={knn.k} is more than the {len(data.train)} training images of data={cfg.data.name} "
                        "(after the validation split); lower model.k")
    train_x, train_y = preprocessed(data.train, data.preprocess, device)
    val_x, val_y = preprocessed(data.val, data.preprocess, device)
    by_distance = None
    if auto:
        knn, by_distance = choose_on_val(knn, train_x, train_y, val_x, val_y, data.num_classes, auto)
        with open_dict(cfg):  # the run's config (hparams, the checkpoint) holds the chosen values
            cfg.model.k, cfg.model.distance = knn.k, knn.distance
    ks = sorted(set(K_GRID) | {knn.k})
    logger = RunLogger(run_dir, run_hparams(cfg))
    try:
        log.info("%s (k=%d, %s): %d training images memorized, %d val queries, device %s",
                 cfg.model.name, knn.k, knn.distance, len(train_y), len(val_y), device)
        knn.fit(train_x, train_y, data.num_classes)
        fit_time = time.perf_counter() - start
        val_acc = accuracy_by_k(knn, val_x, val_y, ks)
        for k, acc in val_acc.items():
            logger.scalars({"knn/val_acc": acc}, k)
        best_k = max(val_acc, key=lambda k: (val_acc[k], -k))
        summary = {"status": "completed", "best_val_acc": val_acc[knn.k], "best_epoch": 0,
                   "final_val_acc": val_acc[knn.k], "epochs": 0, "k": knn.k, "distance": knn.distance,
                   "val_acc_by_k": val_acc, "best_k_on_val": best_k}
        if auto:  # model.k / model.distance chosen on val: what was tried
            summary.update(chosen_on_val=sorted(auto), val_acc_by_distance_k=by_distance)
        log.info("val accuracy by k: %s", ", ".join(f"k={k}: {100 * a:.2f}%" for k, a in val_acc.items()))
        if knn.cv_folds:
            cv = cross_validate(knn, train_x, train_y, data.num_classes, ks, knn.cv_folds, cfg.data.split_seed)
            for k, acc in cv.items():
                logger.scalars({"knn/cv_acc": acc}, k)
            summary.update(cv_acc=cv[knn.k], cv_acc_by_k=cv, best_k_on_cv=max(cv, key=lambda k: (cv[k], -k)),
                           cv_folds=knn.cv_folds)
            log.info("%d-fold cross-validation accuracy by k: %s", knn.cv_folds,
                     ", ".join(f"k={k}: {100 * a:.2f}%" for k, a in cv.items()))
        if cfg.trainer.test:
            test_x, test_y = preprocessed(data.test, data.preprocess, device)
            summary["test_acc"] = (knn.predict(test_x) == test_y).float().mean().item()
        summary.update(train_time_s=round(time.perf_counter() - start, 3),
                       train_images_per_s=round(len(train_y) / max(fit_time, 1e-9), 1), params=0,
                       device=str(device))
        logger.summary(summary, knn.k)
    finally:
        logger.close()
    if cfg.trainer.checkpoint:  # the fitted model, for task=evaluate / predict / export
        save_checkpoint(run_dir / "checkpoints" / "best.pt",
                        fitted_checkpoint(data.train.images[:], data.train.labels, OmegaConf.to_container(cfg, resolve=True),
                                          data, summary["best_val_acc"]))
    write_summary(run_dir, summary)
    log.info("done: k=%d val acc %.2f%% (best k on val: %d)%s | %.1f s | %s", knn.k, 100 * summary["best_val_acc"],
             best_k, f" | test acc {100 * summary['test_acc']:.2f}%" if "test_acc" in summary else "",
             summary["train_time_s"], run_dir)
    return summary["best_val_acc"]


def _without_auto(cfg) -> tuple:
    """(cfg, the keys set to auto): model.k=auto / model.distance=auto replaced by placeholders (k=1, l2) in a
    copy of cfg, so the classifier builds; choose_on_val picks the real values."""
    auto = {key for key in ("k", "distance") if cfg.model.get(key) == "auto"}
    if not auto:
        return cfg, auto
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if "k" in auto:
            cfg.model.k = 1
        if "distance" in auto:
            cfg.model.distance = AUTO_DISTANCES[0]
    return cfg, auto


def choose_on_val(knn: KNNClassifier, train_x, train_y, val_x, val_y, num_classes: int, auto: set) -> tuple:
    """model.k=auto and/or model.distance=auto: the (distance, k) with the best validation accuracy among
    every k of K_GRID (up to the number of training images) and each distance of AUTO_DISTANCES (or the
    configured k / distance); ties go to the smaller k, then the first distance. Returns (the classifier
    with them, {distance: {k: val accuracy}}), after logging the table of what was tried."""
    distances = AUTO_DISTANCES if "distance" in auto else (knn.distance,)
    ks = K_GRID if "k" in auto else (knn.k,)
    by_distance = {}
    for distance in distances:
        candidate = KNNClassifier(1, distance, knn.chunk_size, knn.cv_folds).fit(train_x, train_y, num_classes)
        by_distance[distance] = accuracy_by_k(candidate, val_x, val_y, ks)
    _, minus_k, minus_i = max((acc, -k, -i) for i, distance in enumerate(distances)
                              for k, acc in by_distance[distance].items())
    k, distance = -minus_k, distances[-minus_i]
    ks_tried = sorted({k for accs in by_distance.values() for k in accs})
    table = format_table(["distance", *[f"k={k}" for k in ks_tried]],
                         [[d, *[f"{100 * accs[k]:.2f}%" if k in accs else "-" for k in ks_tried]]
                          for d, accs in by_distance.items()], right=range(1, len(ks_tried) + 1))
    log.info("%s chosen on the validation split: k=%d, distance %s (val acc %.2f%%); val accuracy tried:\n%s",
             " and ".join(f"model.{key}" for key in sorted(auto)), k, distance,
             100 * by_distance[distance][k], table)
    return KNNClassifier(k, distance, knn.chunk_size, knn.cv_folds), by_distance
