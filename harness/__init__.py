"""streamline-bench harness: the small public interface methods are written against.

A method plugin imports only from here::

    from harness import MethodConfig, MethodContext, PruneResult, register_method
"""
from harness.errors import UsageError
from harness.fitting.fit import fit_to_boundaries
from harness.model.adapters import (
    ModelAdapter,
    ReplacedBlock,
    get_adapter,
    supported_model_types,
)
from harness.model.replacement import MLPReplacement, describe
from harness.model.saving import load_pruned, save_pruned
from harness.model.surgery import count_params, insert_replacement, remove_layers
from harness.plugins.context import MethodContext
from harness.plugins.registry import (
    MethodConfig,
    PruneResult,
    available_methods,
    register_method,
)

__all__ = [
    "MLPReplacement", "MethodConfig", "MethodContext", "ModelAdapter", "PruneResult", "ReplacedBlock",
    "UsageError", "available_methods", "count_params", "describe", "fit_to_boundaries", "get_adapter",
    "insert_replacement", "load_pruned", "register_method", "remove_layers", "save_pruned",
    "supported_model_types",
]

# post-steps run after any method: ``--methods shortgpt+lora`` (see registry.resolve_method)
from harness.plugins.registry import available_post_steps, register_post_step  # noqa: E402

__all__ += ["available_post_steps", "register_post_step"]

# LaCo-style tentative merges (try a removal, roll back) and hand-built token batches
from harness.model.surgery import restore_layers, snapshot_layers  # noqa: E402
from harness.signals.calibration import CalibrationData  # noqa: E402

__all__ += ["CalibrationData", "restore_layers", "snapshot_layers"]
