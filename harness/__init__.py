"""streamline-bench harness: the public interface methods are written against.

A method plugin imports only from here (built-in methods included; a test enforces it)::

    from harness import MethodConfig, MethodContext, PruneResult, option, register_method

The stages behind it, in pipeline order: ``model`` (loading, adapters, surgery, saving),
``signals`` (calibration, activations, scores), ``fitting`` (replacement training),
``plugins`` (registry, options, pipelines, context), ``evaluation``, ``results``.
"""
_SOURCES = {  # name -> the module that defines it (imported on first use: `import harness` stays light)
    **dict.fromkeys(('MethodConfig', 'WindowConfig', 'option'), "harness.plugins.options"),
    **dict.fromkeys(('MethodContext',), "harness.plugins.context"),
    **dict.fromkeys(('PruneResult', 'register_method', 'register_post_step', 'available_methods', 'available_post_steps'), "harness.plugins.registry"),
    **dict.fromkeys(('UsageError',), "harness.errors"),
    **dict.fromkeys(('ModelAdapter', 'get_adapter', 'supported_model_types', 'unwrap_layer', 'ReplacedBlock', 'ReplacementLayer'), "harness.model.adapters"),
    **dict.fromkeys(('count_params', 'remove_layers', 'insert_replacement', 'insert_layer_replacement', 'snapshot_layers', 'restore_layers'), "harness.model.surgery"),
    **dict.fromkeys(('MLPReplacement', 'MultiMLPReplacement', 'ACTIVATIONS', 'DEFAULT_HIDDEN_MULT', 'mlp_width', 'mlp_params', 'describe', 'describe_layer', 'register_replacement', 'INITS', 'identity_check'), "harness.model.replacement"),
    **dict.fromkeys(('fit_to_boundaries', 'fit_layer_to_boundaries', 'heldout_mse', 'FIT_LOSSES'), "harness.fitting.fit"),
    **dict.fromkeys(('train_lm', 'steps_for'), "harness.fitting.training"),
    **dict.fromkeys(('use_checkpointing', 'CHECKPOINT_CHOICES', 'CACHE_CHOICES'), "harness.fitting.scale"),
    **dict.fromkeys(('CalibrationData',), "harness.signals.calibration"),
    **dict.fromkeys(('save_pruned', 'load_pruned'), "harness.model.saving"),
}

__all__ = [
    # writing a method: its config, what it receives, what it returns, registration
    "MethodConfig", "WindowConfig", "option", "MethodContext", "PruneResult", "register_method", "register_post_step",
    "available_methods", "available_post_steps", "UsageError",
    # the model: adapters and surgery
    "ModelAdapter", "get_adapter", "supported_model_types", "unwrap_layer", "count_params", "remove_layers",
    "insert_replacement", "insert_layer_replacement", "snapshot_layers", "restore_layers",
    "ReplacedBlock", "ReplacementLayer",
    # replacement networks and their training
    "MLPReplacement", "MultiMLPReplacement", "ACTIVATIONS", "DEFAULT_HIDDEN_MULT", "mlp_width", "mlp_params",
    "describe", "describe_layer", "register_replacement", "fit_to_boundaries", "fit_layer_to_boundaries", "heldout_mse", "INITS", "FIT_LOSSES",
    "identity_check", "train_lm", "steps_for",
    "use_checkpointing", "CHECKPOINT_CHOICES", "CACHE_CHOICES",
    # data and saved models
    "CalibrationData", "save_pruned", "load_pruned",
]
__all__ += ["run", "report"]  # the Python API (harness.api)
_SOURCES.update(run="harness.api", report="harness.api")


def __getattr__(name: str):
    """The plugin API and the Python API, imported on first use (PEP 562): ``import harness`` (e.g. for
    the CLI's defaults) does not import torch."""
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'harness' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
