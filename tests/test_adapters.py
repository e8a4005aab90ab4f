"""Adapters on tiny randomly initialised models of each family, built in the test."""
import pytest
import torch
from conftest import FAMILIES, tiny_config, tiny_model
from torch import nn

from harness import (
    MLPReplacement,
    UsageError,
    get_adapter,
    insert_replacement,
    remove_layers,
)
from harness.model.adapters import ReplacedBlock, unwrap_layer
from harness.model.surgery import count_params


def _greedy(model, ids, steps, use_cache):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         use_cache=use_cache, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_interface(family):
    model = tiny_model(family, layers=5)
    a = get_adapter(model)
    assert a.num_layers == 5 == len(a.layers)
    assert a.hidden_size == 32
    assert a.final_norm is not None and a.embeddings
    assert all(isinstance(e, nn.Module) for e in a.embeddings)
    fresh = a.new_layer(2)
    assert type(fresh) is type(a.layers[0])
    assert fresh.state_dict().keys() == a.layers[0].state_dict().keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_layers_keeps_config_indices_and_kv_cache_consistent(family):
    model = tiny_model(family, layers=6)
    a = get_adapter(model)
    per_layer = count_params(a.layers[0])
    before = count_params(model)
    kept_modules = [a.layers[i] for i in (0, 1, 3, 5)]
    remove_layers(a, [2, 4])
    assert a.num_layers == 4 and model.config.num_hidden_layers == 4
    assert list(a.layers) == kept_modules
    for i, layer in enumerate(a.layers):
        assert a.attention_of(layer).layer_idx == i
    lt = getattr(model.config, "layer_types", None)
    if lt is not None:
        assert len(lt) == 4
    assert count_params(model) == before - 2 * per_layer
    ids = torch.randint(3, 128, (1, 6))
    assert torch.equal(_greedy(model, ids, 8, True), _greedy(model, ids, 8, False))


@pytest.mark.parametrize("family", ["opt", "llama", "gpt_neox"])
@pytest.mark.parametrize("start", [0, 2, 4])
def test_replacement_runs_in_place_of_the_window_with_a_kv_cache(family, start):
    model = tiny_model(family, layers=6)
    a = get_adapter(model)
    remove_layers(a, range(start, start + 2))
    mlp = MLPReplacement(32, 16)
    where = insert_replacement(a, start, mlp)
    assert where == ("pre" if start < 4 else "post")
    assert model.config.num_hidden_layers == 4 == a.num_layers
    wrapped = [l for l in a.layers if isinstance(l, ReplacedBlock)]
    assert len(wrapped) == 1 and wrapped[0].replacement is mlp
    for i, layer in enumerate(a.layers):
        assert unwrap_layer(layer).self_attn.layer_idx == i if family != "gpt_neox" else \
            unwrap_layer(layer).attention.layer_idx == i
    ids = torch.randint(3, 128, (1, 5))
    assert torch.equal(_greedy(model, ids, 6, True), _greedy(model, ids, 6, False))
    # the replacement really runs: zeroing it changes the logits
    with torch.no_grad():
        base = model(ids).logits
        for p in mlp.parameters():
            p.add_(1.0)
        assert not torch.allclose(base, model(ids).logits)


def test_unsupported_architecture_names_the_supported_ones():
    # GPT-2 is not in the adapter table but its structure is found (transformer.h, transformer.ln_f);
    # a causal LM without a final norm after its layer list (BERT as a decoder) is unsupported
    from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    a = get_adapter(gpt2)
    assert a.layers is gpt2.transformer.h and a.final_norm is gpt2.transformer.ln_f
    model = BertLMHeadModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=64, is_decoder=True))
    with pytest.raises(UsageError, match="unsupported architecture 'bert'.*llama.*opt"):
        get_adapter(model)


def test_adapter_is_chosen_from_config_not_name():
    # A Llama config saved under a misleading name still gets the Llama adapter.
    model = tiny_model("llama", layers=2)
    model.name_or_path = "my-opt-finetune"
    assert type(get_adapter(model)).__name__ == "LlamaAdapter"
    assert tiny_config("opt").model_type == "opt"
