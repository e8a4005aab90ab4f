"""Reliability, round two (part): non-finite option values, reserved and path-like method names."""
import pytest

from harness import MethodConfig, register_method
from harness.errors import UsageError
from harness.plugins.pipeline import resolve_method


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
@pytest.mark.parametrize("key", ["lr", "weight_decay", "activation_cache_gb", "post_train_lr", "hidden_mult"])
def test_float_options_refuse_non_finite_values_at_parse_time(key, value):
    with pytest.raises(UsageError, match="finite number"):
        resolve_method("streamline", {"streamline": {key: value}})


@pytest.mark.parametrize("name", ["dense", "../evil", "a/b", "a\\b", " x", "x y", "c:d"])
def test_reserved_and_path_like_method_names_cannot_be_registered(name):
    with pytest.raises(ValueError):
        register_method(name, MethodConfig)(lambda ctx, cfg: None)
