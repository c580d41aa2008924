"""build_model: the model a config's `model` node describes, initialized per model.init."""
from omegaconf import OmegaConf

from cvtrain import UserError
from cvtrain.models.init import init_weights
from cvtrain.models.registry import create_model, list_models, model_builder, model_kind
from cvtrain.models.transfer import check_options, split_options
from cvtrain.checks import check_model_values, check_types


def build_model(model_cfg, in_shape, num_classes: int):
    """The model for images of `in_shape` (C, H, W) and `num_classes` classes.

    `model_cfg` is the config's `model` node (DictConfig or dict): `name`, the model's own options
    and, for a trained model, `init` (default native) and `bias_init` (default 0.0), applied by
    init_weights together with the output-layer rule. A fitted model (model_kind: kNN) is built as is;
    init and bias_init are not among its options. model.pretrained and model.freeze (models/transfer.py)
    are checked and left out here: task=train applies them to the built model (transfer.prepare).
    """
    options = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    name = options.pop("name", None)
    if not name:
        raise UserError(f"model.name is missing; registered models: {', '.join(list_models())}")
    in_shape = tuple(in_shape)
    check_options(name, split_options(options))  # model.pretrained, model.freeze: kNN refuses them
    check_types("model", name, options, model_builder(name))  # model.hidden_sizes=512, model.dropout=x: the expected type
    check_model_values(name, options)
    if model_kind(name) == "fitted":
        return create_model(name, in_shape, num_classes, **options)
    scheme, bias_init = options.pop("init", "native"), options.pop("bias_init", 0.0)
    model = create_model(name, in_shape, num_classes, **options)
    init_weights(model, scheme, bias_init, in_shape)
    return model
