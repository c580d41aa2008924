"""k-nearest-neighbour classifier: "training" memorizes the training images, preprocessed
as data.preprocess says (as for every model); prediction compares a query with every one of them.

Distances are computed in chunks of queries on the training device, so memory stays
bounded (chunk_size x N_train distances at a time): L2 through
||q||^2 - 2 q.t + ||t||^2 (one matrix product), L1 through torch.cdist. The vote is a
plain majority among the k nearest; a tie goes to the smallest class index, as in
scikit-learn's KNeighborsClassifier.
"""
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cvtrain import UserError

log = logging.getLogger("cvtrain")
K_GRID = (1, 3, 5, 7, 10, 15, 20, 30, 50, 100)  # k values whose accuracy every run reports


class KNNClassifier:
    def __init__(self, k: int = 5, distance: str = "l2", chunk_size: int = 256):
        if distance not in ("l1", "l2"):
            raise UserError(f"model.distance='{distance}' is unknown; choose l1 or l2")
        if k < 1:
            raise UserError(f"model.k={k} must be at least 1")
        self.k, self.distance, self.chunk_size = k, distance, chunk_size

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> "KNNClassifier":
        self.train_x = x.flatten(1).float()
        self.train_y = y
        self.num_classes = num_classes
        self.train_sq = (self.train_x * self.train_x).sum(1)
        return self

    def neighbours(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Labels of the k nearest training images of each query, nearest first: (N, k)."""
        k = min(k, len(self.train_y))
        out = []
        for q in x.flatten(1).float().split(self.chunk_size):
            if self.distance == "l2":
                d = (q * q).sum(1, keepdim=True) - 2 * q @ self.train_x.T + self.train_sq
            else:
                d = torch.cdist(q, self.train_x, p=1)
            out.append(self.train_y[d.topk(k, dim=1, largest=False, sorted=True).indices])
        return torch.cat(out)

    def vote(self, neighbour_labels: torch.Tensor, k: int) -> torch.Tensor:
        counts = torch.nn.functional.one_hot(neighbour_labels[:, :k], self.num_classes).sum(1)
        return counts.argmax(1)  # first maximum: ties go to the smallest class index

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.vote(self.neighbours(x, self.k), self.k)


def _accuracy_by_k(knn: KNNClassifier, x, y, ks) -> dict:
    labels = knn.neighbours(x, max(ks))
    return {k: (knn.vote(labels, k) == y).float().mean().item() for k in ks if k <= labels.shape[1]}


def _preprocessed(split, preprocess, device, chunk: int = 10_000):
    """(images through the fitted data.preprocess, labels), on `device`; converted in chunks."""
    preprocess = preprocess.to(device)
    x = torch.cat([preprocess(part.to(device).float().div_(255)) for part in split.images.split(chunk)])
    return x, split.labels.to(device)


def run_knn(cfg, run_dir: Path, device: torch.device, logger_factory) -> dict:
    """The kNN 'training' run: memorize, choose k on val (and k-fold CV), write the run dir."""
    from cvtrain.data import load_data, stratified_split

    options = OmegaConf.to_container(cfg.model, resolve=True)
    unknown = set(options) - {"name", "k", "distance", "chunk_size", "cv_folds", "init", "bias_init"}
    if unknown:
        raise UserError(f"model knn has no option(s) {sorted(unknown)}")
    knn = KNNClassifier(options["k"], options["distance"], options["chunk_size"])
    folds = options["cv_folds"]
    if folds == 1 or folds < 0:
        raise UserError(f"model.cv_folds={folds}: use 0 (no cross-validation) or 2 and more")
    start = time.perf_counter()
    data = load_data(cfg.data, device, need_test=cfg.trainer.test)
    train_x, train_y = _preprocessed(data.train, data.preprocess, device)
    val_x, val_y = _preprocessed(data.val, data.preprocess, device)
    ks = sorted(set(K_GRID) | {knn.k})
    logger = logger_factory(data)
    log.info("knn (k=%d, %s): %d training images memorized, %d val queries, device %s",
             knn.k, knn.distance, len(train_y), len(val_y), device)

    knn.fit(train_x, train_y, data.num_classes)
    fit_time = time.perf_counter() - start
    val_acc = _accuracy_by_k(knn, val_x, val_y, ks)
    for k, acc in val_acc.items():
        logger.scalars({"knn/val_acc": acc}, k)
    best_k = max(val_acc, key=lambda k: (val_acc[k], -k))
    summary = {"best_val_acc": val_acc[knn.k], "k": knn.k, "distance": knn.distance,
               "val_acc_by_k": val_acc, "best_k_on_val": best_k, "epochs": 0, "params": 0}
    log.info("val accuracy by k: %s", ", ".join(f"k={k}: {100 * a:.2f}%" for k, a in val_acc.items()))

    if folds:
        cv = {k: [] for k in ks}
        for fold in range(folds):  # each fold holds out 1/folds of every class, drawn anew per fold
            fit_idx, held_idx = stratified_split(data.train.labels, 1 / folds, seed=cfg.data.split_seed + fold)
            fold_knn = KNNClassifier(knn.k, knn.distance, knn.chunk_size)
            fold_knn.fit(train_x[fit_idx.to(device)], train_y[fit_idx.to(device)], data.num_classes)
            for k, acc in _accuracy_by_k(fold_knn, train_x[held_idx.to(device)], train_y[held_idx.to(device)],
                                         ks).items():
                cv[k].append(acc)
        cv_mean = {k: sum(v) / len(v) for k, v in cv.items() if v}
        for k, acc in cv_mean.items():
            logger.scalars({"knn/cv_acc": acc}, k)
        summary.update(cv_acc=cv_mean[knn.k], cv_acc_by_k=cv_mean,
                       best_k_on_cv=max(cv_mean, key=lambda k: (cv_mean[k], -k)), cv_folds=folds)
        log.info("%d-fold cross-validation accuracy by k: %s", folds,
                 ", ".join(f"k={k}: {100 * a:.2f}%" for k, a in cv_mean.items()))

    if cfg.trainer.test:
        test_x, test_y = _preprocessed(data.test, data.preprocess, device)
        summary["test_acc"] = (knn.predict(test_x) == test_y).float().mean().item()
    summary["train_time_s"] = round(time.perf_counter() - start, 3)
    summary["train_images_per_s"] = round(len(train_y) / max(fit_time, 1e-9), 1)
    summary["final_val_acc"] = summary["best_val_acc"]
    logger.summary(summary, knn.k)
    logger.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done: k=%d val acc %.2f%% (best k on val: %d)%s | %.1f s | %s", knn.k, 100 * summary["best_val_acc"],
             best_k, f" | test acc {100 * summary['test_acc']:.2f}%" if "test_acc" in summary else "",
             summary["train_time_s"], run_dir)
    return summary
