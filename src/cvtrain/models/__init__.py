"""Model families, one file each; importing this package registers them all.

    build_model(model_cfg, in_shape, num_classes)   the configured model, initialized per model.init
    model_kind(name)                                "trained" (optimizer loop) or "fitted" (kNN)
    list_models(kind=None), create_model(name, in_shape, num_classes, **options), register_model
    init_weights(model, scheme, bias_init, in_shape), final_layer(model, in_shape)
"""
from cvtrain.models import (alexnet, densenet, googlenet, knn, lenet, linear, mlp, nin,  # noqa: F401  (registration)
                            resnet, vgg)
from cvtrain.models import speedrun  # noqa: F401  (registration: airbench)
from cvtrain.models.build import build_model
from cvtrain.models.init import final_layer, init_weights
from cvtrain.models.registry import create_model, list_models, model_kind, register_model

__all__ = ["build_model", "create_model", "final_layer", "init_weights", "list_models", "model_kind",
           "register_model"]
