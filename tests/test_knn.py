import json

import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from cvtrain import UserError
from cvtrain.models import create_model, model_kind
from cvtrain.models.knn import KNNClassifier


@pytest.mark.parametrize("distance,metric", [("l2", "euclidean"), ("l1", "manhattan")])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_predictions_agree_with_scikit_learn(distance, metric, k):
    gen = torch.Generator().manual_seed(k)
    train_x, train_y = torch.randn(600, 48, generator=gen), torch.randint(0, 5, (600,), generator=gen)
    queries = torch.randn(150, 48, generator=gen)
    ours = KNNClassifier(k, distance, chunk_size=32).fit(train_x, train_y, 5).predict(queries)
    sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric=metric).fit(train_x.numpy(), train_y.numpy())
    assert torch.equal(ours, torch.from_numpy(sk.predict(queries.numpy())))


def test_tie_goes_to_the_smallest_class():
    train_x = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]])
    train_y = torch.tensor([3, 1, 3, 1])
    knn = KNNClassifier(k=2).fit(train_x, train_y, 4)
    assert knn.predict(torch.tensor([[0.0]])).item() == 1


def test_chunking_does_not_change_predictions():
    x, y = torch.randn(300, 20), torch.randint(0, 3, (300,))
    q = torch.randn(97, 20)
    one = KNNClassifier(5, chunk_size=1000).fit(x, y, 3).predict(q)
    many = KNNClassifier(5, chunk_size=7).fit(x, y, 3).predict(q)
    assert torch.equal(one, many)


def test_bad_options_are_clear_errors():
    with pytest.raises(UserError, match="l1 or l2"):
        KNNClassifier(distance="cosine")
    with pytest.raises(UserError, match="at least 1"):
        KNNClassifier(k=0)
    for folds in (1, -2):
        with pytest.raises(UserError, match="0 \\(no cross-validation\\) or 2 and more"):
            KNNClassifier(cv_folds=folds)


def test_registered_as_a_fitted_model_that_carries_its_options():
    assert model_kind("knn") == "fitted"
    knn = create_model("knn", (3, 8, 8), 4, k=7, distance="l1", chunk_size=16, cv_folds=3)
    assert isinstance(knn, KNNClassifier)
    assert (knn.k, knn.distance, knn.chunk_size, knn.cv_folds) == (7, "l1", 16, 3)
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 4, (40,))
    assert torch.equal(knn.fit(x, y, 4).predict(x[:5]), KNNClassifier(7, "l1").fit(x, y, 4).predict(x[:5]))


def test_knn_run_writes_summary_and_tensorboard(run_cli, tmp_path):
    result = run_cli(["model=knn", "model.k=3", "model.cv_folds=3", "data=synthetic", "data.num_samples=300",
                      "data.image_size=8", "trainer.test=true"], tmp_path)
    assert result.returncode == 0, result.stdout
    run_dir = next((tmp_path / "outputs").glob("*/*knn*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["k"] == 3 and summary["epochs"] == 0
    assert summary["best_val_acc"] > 0.5 and summary["cv_acc"] > 0.5 and "test_acc" in summary
    assert set(map(int, summary["val_acc_by_k"])) >= {1, 3, 5}
    assert list(run_dir.glob("events.out.tfevents.*"))
