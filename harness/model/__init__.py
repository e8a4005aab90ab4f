"""Stage 1, the model: loading, architecture adapters, replacement modules, surgery, targets, saving."""
