"""DenseNet models in Flax: jax, flax and numpy only (no TensorFlow, optax or orbax; nothing read of the machine).

    from densenet_jax.model import create_model
    model = create_model('densenet121', num_classes=1000)

densenet.py is the paper, readable (start there); layers.py its BatchNorm; registry.py the paper's models by name;
forms/ faster forms of the same function (kernels for XLA:CPU, scanned blocks), chosen by the model's form attributes.
"""

from densenet_jax.model.densenet import DenseBlock, DenseLayer, DenseNet, Transition
from densenet_jax.model.registry import (
    FORM_FIELDS,
    MODELS,
    WeightMismatchError,
    abstract_variables,
    cifar_densenet,
    create_model,
    describe,
    from_config,
    imagenet_densenet,
    init_variables,
    replace_head,
)

__all__ = [
    'FORM_FIELDS',
    'MODELS',
    'DenseBlock',
    'DenseLayer',
    'DenseNet',
    'Transition',
    'WeightMismatchError',
    'abstract_variables',
    'cifar_densenet',
    'create_model',
    'describe',
    'from_config',
    'imagenet_densenet',
    'init_variables',
    'replace_head',
]
