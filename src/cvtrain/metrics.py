"""Classification metrics from one pass of scores: what task=evaluate reports.

    report(scores, labels, classes, loss_fn=None, bins=15)  -> dict (eval.json's figures)
    calibration(probabilities, labels, bins)                -> (ECE, per-bin rows)
    per_class(confusion)                                    -> precision, recall, F1, support per class

Probabilities are the softmax of the scores (kNN's scores are log vote fractions, so its probabilities
are the vote fractions). Calibration (Guo et al. 2017, "On Calibration of Modern Neural Networks"): the
top-1 confidences fall into `bins` equal-width bins of [0, 1]; ECE = sum over bins of
(images in the bin / all images) x |accuracy in the bin - mean confidence in the bin|. Precision of a
class that is never predicted, and F1 where precision and recall are both 0, are 0 (scikit-learn's
zero_division=0).
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def confusion(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """The fraction of images whose label is among the k highest scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels.unsqueeze(1)).any(1).double().mean().item()


def per_class(counts: torch.Tensor) -> dict:
    """{"precision", "recall", "f1", "support"}: lists, one value per class, from the confusion counts."""
    counts = counts.double()
    tp, predicted, actual = counts.diag(), counts.sum(0), counts.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(tp))
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": [int(v) for v in actual.tolist()]}


def calibration(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> tuple[float, list]:
    """(expected calibration error, one row per bin: low, high, count, accuracy, confidence) of the top-1
    predictions; a bin's accuracy and confidence are None when no image falls into it. The last bin is
    closed ([1 - 1/bins, 1]), the others half-open."""
    confidence, preds = probabilities.double().max(1)
    correct = (preds == labels).double()
    index = (confidence * bins).long().clamp_(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    n = max(len(labels), 1)
    ece = ((acc_sum - conf_sum).abs() / n).sum().item()  # sum_b n_b/n |acc_b - conf_b|
    rows = [{"low": b / bins, "high": (b + 1) / bins, "count": int(count[b]),
             "accuracy": acc_sum[b].item() / count[b].item() if count[b] else None,
             "confidence": conf_sum[b].item() / count[b].item() if count[b] else None} for b in range(bins)]
    return ece, rows


def report(scores: torch.Tensor, labels: torch.Tensor, classes, loss_fn: Optional[Callable] = None,
           bins: int = 15) -> dict:
    """Every figure of one pass: accuracy, top5 (None with 5 classes or fewer), loss (`loss_fn`, the run's
    loss; None without one), nll (mean cross-entropy of the softmax; None when infinite, as kNN's can be),
    per_class ({class: precision, recall, f1, support}), macro averages, ece and its bins, confusion."""
    scores, labels = scores.float().cpu(), labels.long().cpu()
    k = len(classes)
    preds = scores.argmax(1)
    counts = confusion(labels, preds, k)
    pc = per_class(counts)
    probabilities = scores.softmax(1)
    ece, ece_bins = calibration(probabilities, labels, bins)
    loss = loss_fn(scores, labels).item() if loss_fn is not None else None
    nll = F.cross_entropy(scores, labels).item()
    return {
        "images": len(labels),
        "accuracy": (preds == labels).double().mean().item(),
        "top5": topk_accuracy(scores, labels, 5) if k > 5 else None,
        "loss": loss,
        "nll": nll if torch.isfinite(torch.tensor(nll)) else None,
        "per_class": {str(c): {key: pc[key][i] for key in ("precision", "recall", "f1", "support")}
                      for i, c in enumerate(classes)},
        "macro_precision": sum(pc["precision"]) / k, "macro_recall": sum(pc["recall"]) / k,
        "macro_f1": sum(pc["f1"]) / k,
        "ece": ece, "ece_bins": ece_bins,
        "confusion_matrix": counts.tolist(),
        "mean_confidence": probabilities.max(1).values.double().mean().item(),
    }
