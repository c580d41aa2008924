"""Model families, one file each; importing this package registers them all."""
from cvtrain.models import alexnet, densenet, googlenet, lenet, linear, mlp, nin, resnet, vgg  # noqa: F401  (registration side effect)
from cvtrain.models.init import init_weights
from cvtrain.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "init_weights", "list_models", "register_model"]
