"""streamline-bench harness: the public interface methods are written against.

A method plugin imports only from here (built-in methods included; a test enforces it)::

    from harness import MethodConfig, MethodContext, PruneResult, option, register_method

The stages behind it, in pipeline order: ``model`` (loading, adapters, surgery, saving),
``signals`` (calibration, activations, scores), ``fitting`` (replacement training),
``plugins`` (registry, options, pipelines, context), ``evaluation``, ``results``.
"""
from harness.errors import UsageError
from harness.fitting.fit import FIT_LOSSES, fit_layer_to_boundaries, fit_to_boundaries, heldout_mse
from harness.fitting.scale import CACHE_CHOICES, CHECKPOINT_CHOICES, use_checkpointing
from harness.fitting.training import steps_for, train_lm
from harness.model.adapters import (
                                    ModelAdapter,
                                    ReplacedBlock,
                                    ReplacementLayer,
                                    get_adapter,
                                    supported_model_types,
                                    unwrap_layer,
)
from harness.model.replacement import (
                                    ACTIVATIONS,
                                    DEFAULT_HIDDEN_MULT,
                                    INITS,
                                    MLPReplacement,
                                    MultiMLPReplacement,
                                    describe,
                                    describe_layer,
                                    identity_check,
                                    mlp_params,
                                    mlp_width,
                                    register_replacement,
)
from harness.model.saving import load_pruned, save_pruned
from harness.model.surgery import (
                                    count_params,
                                    insert_layer_replacement,
                                    insert_replacement,
                                    remove_layers,
                                    restore_layers,
                                    snapshot_layers,
)
from harness.plugins.context import MethodContext
from harness.plugins.options import MethodConfig, WindowConfig, option
from harness.plugins.registry import (
                                    PruneResult,
                                    available_methods,
                                    available_post_steps,
                                    register_method,
                                    register_post_step,
)
from harness.signals.calibration import CalibrationData

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
