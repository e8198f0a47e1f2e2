"""Pretrained weights: PyTorch (torchvision / timm) and Keras applications DenseNets -> Flax variables.

Command line (installed as a package: densenet-convert; see docs/pretrained.md):

    python -m densenet_jax.weights convert --source=densenet121-a639ec97.pth --model=densenet121 --output=DIR
    python -m densenet_jax.weights inspect --source=model.safetensors

API. Variables are {'params': ..., 'batch_stats': ...}: nested dicts of numpy float32 arrays in host memory, the
tree of `densenet_jax.model.DenseNet` (docs/models.md), ready for `model.apply(variables, images)`.

    from_torch_state_dict(state_dict, model=None) -> variables
        state_dict: {name: torch.Tensor | np.ndarray} with torchvision / timm names (`features.conv0.weight`,
        ..., `classifier.bias`), old-style `norm.1` names, `module.` prefixes; `num_batches_tracked` ignored.
        model: registry name ('densenet121', ...; classes taken from the file), a model.DenseNet (its
        num_classes must equal the file's), or None (inferred from names and shapes).
    from_keras(source, model=None, *, epsilon=1.001e-5) -> variables
        source: a Keras applications DenseNet121/169/201 model, or {'layer/weight': array}.
        Keras BN epsilon (1.001e-5) is folded into the running variance: var + 1.001e-5 - 1e-5.
    convert_file(path, model=None) -> ConvertedWeights(name, model, variables, framework)
        The DenseNet a weight file holds (registry name when it is one) with its variables.
    load_weights_file(path, model=None) -> variables
        .pth/.pt/.bin (needs torch), .safetensors (needs safetensors), .h5/.keras (needs h5py; Keras 3 files keras).
    read_state_dict(path) -> {name: np.ndarray};  read_keras_file(path) -> ({'layer/weight': array}, epsilons)
    keras_model_weights(keras_model) -> ({'layer/weight': array}, {bn layer: epsilon})
    to_torch_state_dict(variables) -> {torchvision name: np.ndarray}   (the inverse, e.g. for a PyTorch twin)
    infer_model(weights, framework='torch' | 'keras') -> (registry name or None, model.DenseNet)

    save_variables(directory, variables, *, metadata=None, overwrite=False) -> absolute path
        A plain orbax PyTree checkpoint of {'params', 'batch_stats'} (StandardCheckpointer, atomic).
    load_variables(directory) -> variables          (numpy arrays; place / shard them yourself)
    read_metadata(directory) -> dict                (model, num_classes, architecture, source, source_framework)
    replace_head(variables, model, rng) -> variables
        For fine-tuning (`config.init_from`): everything but the classifier must fit `model` exactly; the
        classifier is kept when its shape fits and otherwise initialized as model.init would from `rng`.

Errors: WeightMismatchError (a ValueError; names the first mismatching key with both shapes and lists missing
and unexpected keys; attributes .missing, .unexpected, .mismatched) and WeightFileError (a ValueError; an
unsupported or unreadable file, with the supported formats).

Fine-tuning: `variables = weights.replace_head(weights.load_variables(path), model, jax.random.key(0))`.
Nothing in the training loop imports this package: conversion is done once, before training.
"""

from densenet_jax.model import WeightMismatchError, replace_head
from densenet_jax.io.checkpoints import read_metadata, save_variables
from densenet_jax.io.loading import load_variables
from densenet_jax.weights.convert import (
    KERAS_BN_EPSILON,
    from_keras,
    from_torch_state_dict,
    infer_model,
    keras_model_weights,
    normalize_torch_keys,
    to_torch_state_dict,
)
from densenet_jax.weights.readers import (
    SUPPORTED_FORMATS,
    ConvertedWeights,
    convert_file,
    WeightFileError,
    load_weights_file,
    read_keras_file,
    read_state_dict,
    read_weights,
)

__all__ = [
    'KERAS_BN_EPSILON',
    'ConvertedWeights',
    'SUPPORTED_FORMATS',
    'WeightFileError',
    'WeightMismatchError',
    'convert_file',
    'from_keras',
    'from_torch_state_dict',
    'infer_model',
    'keras_model_weights',
    'load_variables',
    'load_weights_file',
    'normalize_torch_keys',
    'read_keras_file',
    'read_metadata',
    'read_state_dict',
    'read_weights',
    'replace_head',
    'save_variables',
    'to_torch_state_dict',
]
