"""cvtrain's kNN beside scikit-learn's KNeighborsClassifier (brute force, same k and metric):
agreement of the predictions and the time each takes, measured in one run.

    python scripts/bench_knn.py data=imagefolder data.root=/tmp/cifar10 data.val_fraction=0.2
    python scripts/bench_knn.py --queries 2000 --metric l1           # embedded digits by default
Extra arguments are cvtrain config overrides (the data to use).
"""
import argparse
import time

import torch
from hydra import compose, initialize_config_module
from sklearn.neighbors import KNeighborsClassifier

from cvtrain.config import register_configs
from cvtrain.data import load_data
from cvtrain.models.knn import KNNClassifier
from cvtrain.tasks.knn import preprocessed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--metric", choices=["l1", "l2"], default="l2")
    parser.add_argument("--queries", type=int, default=0, help="use only the first N val images (0: all)")
    args, overrides = parser.parse_known_args()
    register_configs()
    with initialize_config_module(config_module="cvtrain.configs", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    data = load_data(cfg.data)
    cpu = torch.device("cpu")
    train_x, train_y = preprocessed(data.train, data.preprocess, cpu)  # data.preprocess, as cvtrain's kNN
    val_x, val_y = preprocessed(data.val, data.preprocess, cpu)
    if args.queries:
        val_x, val_y = val_x[: args.queries], val_y[: args.queries]
    print(f"{len(train_y)} training vectors of {train_x[0].numel()} values, {len(val_y)} queries, "
          f"k={args.k}, {args.metric}, torch threads {torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    ours = KNNClassifier(args.k, args.metric).fit(train_x, train_y, data.num_classes).predict(val_x)
    t_ours = time.perf_counter() - t0

    metric = {"l1": "manhattan", "l2": "euclidean"}[args.metric]
    t0 = time.perf_counter()
    sk = KNeighborsClassifier(n_neighbors=args.k, algorithm="brute", metric=metric)
    theirs = torch.from_numpy(sk.fit(train_x.flatten(1).numpy(), train_y.numpy()).predict(val_x.flatten(1).numpy()))
    t_sk = time.perf_counter() - t0

    agree = (ours == theirs).float().mean().item()
    acc = (ours == val_y).float().mean().item()
    print(f"cvtrain {t_ours:.1f} s | scikit-learn {t_sk:.1f} s | speed-up {t_sk / t_ours:.2f}x | "
          f"predictions agree on {100 * agree:.2f}% | accuracy {100 * acc:.2f}%")
    for i in torch.nonzero(ours != theirs).flatten().tolist()[:10]:
        explain_disagreement(i, train_x, train_y, val_x[i], args.k, args.metric, int(ours[i]), int(theirs[i]))


def explain_disagreement(i, train_x, train_y, query, k, metric, ours, theirs) -> None:
    """Why query i differs: its neighbours in float64, the gap at the k-th one, the votes."""
    diff = train_x.flatten(1).double() - query.flatten().double()
    dist = diff.abs().sum(1) if metric == "l1" else diff.pow(2).sum(1).sqrt()
    order = dist.argsort()
    kth, next_ = dist[order[k - 1]].item(), dist[order[k]].item()
    votes = torch.bincount(train_y[order[:k]], minlength=int(train_y.max()) + 1).tolist()
    print(f"  query {i}: cvtrain says {ours}, scikit-learn {theirs}; float64 votes of the {k} nearest {votes}; "
          f"k-th / (k+1)-th distance {kth:.6f} / {next_:.6f} (relative gap {(next_ - kth) / kth:.1e})")


if __name__ == "__main__":
    main()
