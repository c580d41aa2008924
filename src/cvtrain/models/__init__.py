"""Model families, one file each; importing this package registers them all."""
from cvtrain.models import lenet, linear, mlp  # noqa: F401  (registration side effect)
from cvtrain.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
