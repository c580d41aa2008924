"""k-nearest-neighbour classifier: "training" memorizes the training images, preprocessed
as data.preprocess says (as for every model); prediction compares a query with every one of them.

Distances are computed in chunks of queries on the training device, so memory stays
bounded (chunk_size x N_train distances at a time): L2 through
||q||^2 - 2 q.t + ||t||^2 (one matrix product), L1 through torch.cdist. The vote is a
plain majority among the k nearest; a tie goes to the smallest class index, as in
scikit-learn's KNeighborsClassifier.

Registered as the "fitted" model `knn` (model_kind: no gradient loop): build_model returns a
KNNClassifier carrying its options, cv_folds included, for the task that fits and scores it.
"""
import torch

from cvtrain import UserError
from cvtrain.models.registry import register_model


class KNNClassifier:
    """k nearest neighbours; cv_folds (0: off, >= 2: k-fold cross-validation on the training split)
    is kept for the task that runs it and does not change fit or predict."""

    def __init__(self, k: int = 5, distance: str = "l2", chunk_size: int = 256, cv_folds: int = 0):
        if distance not in ("l1", "l2"):
            raise UserError(f"model.distance='{distance}' is unknown; choose l1 or l2")
        if k < 1:
            raise UserError(f"model.k={k} must be at least 1")
        if cv_folds == 1 or cv_folds < 0:
            raise UserError(f"model.cv_folds={cv_folds}: use 0 (no cross-validation) or 2 and more")
        self.k, self.distance, self.chunk_size, self.cv_folds = k, distance, chunk_size, cv_folds

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


@register_model(kind="fitted")
def knn(in_shape, num_classes, k: int = 5, distance: str = "l2", chunk_size: int = 256, cv_folds: int = 0):
    """k-nearest neighbours on the flattened (preprocessed) images; fitted, not trained."""
    return KNNClassifier(k, distance, chunk_size, cv_folds)
