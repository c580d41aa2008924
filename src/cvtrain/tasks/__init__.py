"""What a command does with the composed config: one module per task, each exposing
`run(cfg, run_dir)` (configs/task/<name>.yaml holds the task's own keys).

    train      tasks/train.py      train and evaluate (fitted models such as kNN: tasks/knn.py)
    summary    tasks/summary.py    the layer table
    sanity     tasks/sanity.py     initial loss, regularization, overfit a tiny subset
    gradcheck  tasks/gradcheck.py  analytic vs numerical gradients
    lr_find    tasks/lr_find.py    the learning-rate range test
    augviz     tasks/augviz.py     a grid of augmented training images
    evaluate   tasks/evaluate.py   a checkpoint's metrics, confusion matrix and calibration on a split
    predict    tasks/predict.py    a checkpoint's classes for image files: predictions.csv
    export     tasks/export.py     a checkpoint as ONNX, TorchScript and torch.export files, checked
               (the three start from checkpoint=<run dir or .pt>: cvtrain/trained.py)

Tasks import building blocks (data, models, losses, optim, loop, monitor, ...), never the reverse.
"""
