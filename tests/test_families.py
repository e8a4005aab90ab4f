"""Every model family on a tiny random model: the adapter's view of its structure, every
registered method (and the LoRA post-step), save -> reload -> identical logits, and cached
greedy generation equal to uncached.

Families: the adapter table's (OPT, Llama, Mistral, Qwen2, Qwen3, GPT-NeoX, Gemma, Gemma 2,
Gemma 3 text, Phi, Phi-3, Mixtral) and GPT-J, which the table deliberately leaves out, so the
structural fallback serves it (``transformer.h`` / ``transformer.ln_f``, another layout).
"""
import copy
import functools

import pytest
import torch
from conftest import run_method, tiny_config, tiny_model, tiny_tokenizer
from torch import nn

from harness import get_adapter, load_pruned, save_pruned
from harness.errors import UsageError
from harness.model.adapters import (
    ADAPTERS,
    StructuralAdapter,
    check_supported_config,
    is_norm,
    unwrap_layer,
)
from harness.model.surgery import count_params, remove_layers
from harness.plugins.registry import available_methods, available_post_steps

UNKNOWN = "gptj"  # not in the adapter table: the structural fallback
FAMILIES = ["opt", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
            "mixtral", UNKNOWN]
LAYERS, N_REMOVE = 4, 2

# small options so every case runs in a fraction of a second
FAST = {"epochs": "1", "train_samples": "8", "batch_size": "4", "post_train_steps": "0",
        "r": "2", "samples": "4", "steps": "1", "threshold": "-1"}  # laco: accept merges (rollback has its own test)


def _runs() -> list[str]:
    """Every registered method, and every post-step after shortgpt (``shortgpt+lora``)."""
    return list(available_methods()) + [f"shortgpt+{step}" for step in available_post_steps()]


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return tiny_tokenizer()


@functools.lru_cache(maxsize=None)
def _dense(family):
    return tiny_model(family, layers=LAYERS)


def _options(name: str) -> dict:
    """FAST values for the options each component of ``name`` has."""
    import dataclasses

    specs = {**available_methods(), **available_post_steps()}
    out = {}
    for part in name.split("+"):
        fields = {f.name for f in dataclasses.fields(specs[part].config_cls)}
        out[part] = {k: v for k, v in FAST.items() if k in fields}
    return out


def _greedy(model, ids, use_cache):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         use_cache=use_cache, pad_token_id=0)
    return out[:, ids.shape[1]:]


# --- the adapter's view of each family --------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_the_structure(family):
    model = copy.deepcopy(_dense(family))
    a = get_adapter(model)
    mt = model.config.model_type
    if family == UNKNOWN:
        assert mt not in ADAPTERS and isinstance(a, StructuralAdapter)
        assert a.layers is model.transformer.h and a.final_norm is model.transformer.ln_f
    else:
        assert type(a) is ADAPTERS[mt]
    assert a.num_layers == LAYERS and a.hidden_size == 32
    assert isinstance(a.embeddings[0], nn.Embedding) and is_norm(a.final_norm)
    # the final norm is the last thing before the LM head: X_L -> norm -> head (-> soft-cap) gives the logits
    ids = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        captured = []
        h = a.layers[-1].register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
        model(ids)
        h.remove()
        assert torch.allclose(a.logits(captured[0]), out.logits, atol=1e-5)

    layer = a.layers[1]
    norms, weights = a.layer_norms(layer), a.layer_weights(layer)
    assert norms and all(is_norm(m) for m in norms.values())
    # every norm by structure is one the adapter names (no norm is merged or adapted as a weight)
    found = {n for n, m in layer.named_modules() if n and is_norm(m)}
    assert set(norms) == found, (set(norms), found)
    norm_params = {f"{n}.{p}" for n, m in norms.items() for p, _ in m.named_parameters()}
    assert norm_params.isdisjoint(weights)
    assert norm_params | set(weights) == {n for n, _ in layer.named_parameters()}  # a partition of the layer
    leaves = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert a.projections and set(a.projections) <= leaves
    proj = a.layer_projections(layer)
    assert all(t.dim() == 2 for t in proj.values())
    # fresh layers, renumbering, per-layer config
    fresh = a.new_layer(1, init=True)
    assert type(fresh) is a.layer_class and fresh.state_dict().keys() == layer.state_dict().keys()
    lt = a.attention_types
    kept = remove_layers(a, [0, 2])
    assert kept == [1, 3] and a.num_layers == 2 == model.config.num_hidden_layers
    if lt is not None:
        assert a.attention_types == [lt[1], lt[3]]
    for i, l in enumerate(a.layers):
        assert all(m.layer_idx == i for m in l.modules() if hasattr(m, "layer_idx"))


def test_family_quirks():
    # Gemma 1-3: embeddings scaled by sqrt(d) inside the module; norms compute x_hat * (1 + w)
    for family in ("gemma", "gemma2", "gemma3_text"):
        a = get_adapter(_dense(family))
        assert a.embedding_scale == pytest.approx(32 ** 0.5) and a.norm_offset == 1.0
        ids = torch.tensor([[5, 6]])
        emb = a.embeddings[0]
        assert torch.allclose(emb(ids), nn.functional.embedding(ids, emb.weight) * 32 ** 0.5)
        assert torch.equal(a.norm_scale(a.final_norm), a.final_norm.weight + 1)
    for family in ("llama", "opt", "mixtral"):
        assert get_adapter(_dense(family)).embedding_scale == 1.0 and get_adapter(_dense(family)).norm_offset == 0
    # Gemma 2/3: sliding-window layers from config.layer_types
    for family in ("gemma2", "gemma3_text"):
        a = get_adapter(_dense(family))
        assert a.sliding_window == 4 and set(a.attention_types) == {"sliding_attention", "full_attention"}
    # Phi: the final norm is model.final_layernorm
    phi = _dense("phi")
    assert get_adapter(phi).final_norm is phi.model.final_layernorm
    assert set(get_adapter(phi).layer_norms(get_adapter(phi).layers[0])) == {"input_layernorm"}
    phi_qk = tiny_model("phi", layers=1)
    phi_qk.config.qk_layernorm = True
    phi_qk = type(phi_qk)(phi_qk.config)  # Phi with the optional q/k LayerNorms
    a = get_adapter(phi_qk)
    assert set(a.layer_norms(a.layers[0])) == {"input_layernorm", "self_attn.q_layernorm", "self_attn.k_layernorm"}
    # Qwen3 / Gemma 3: q/k norms are norms, not weights
    for family in ("qwen3", "gemma3_text"):
        a = get_adapter(_dense(family))
        assert {"self_attn.q_norm", "self_attn.k_norm"} <= set(a.layer_norms(a.layers[0]))
    # Phi-3: fused qkv and gate_up split into views of the fused weights
    a = get_adapter(_dense("phi3"))
    layer = a.layers[0]
    proj = a.layer_projections(layer)
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    assert torch.equal(torch.cat([proj["self_attn.q_proj"], proj["self_attn.k_proj"], proj["self_attn.v_proj"]]), qkv)
    assert proj["self_attn.q_proj"].shape == (32, 32) and proj["self_attn.k_proj"].shape == (16, 32)
    assert torch.equal(torch.cat([proj["mlp.gate_proj"], proj["mlp.up_proj"]]), gate_up)
    assert proj["mlp.gate_proj"].data_ptr() == gate_up.data_ptr()  # a view, not a copy
    # Mixtral: the router and every expert's gate/up/down
    a = get_adapter(_dense("mixtral"))
    layer = a.layers[0]
    weights, proj = a.layer_weights(layer), a.layer_projections(layer)
    assert {"mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(weights)
    assert weights["mlp.experts.gate_up_proj"].shape[0] == a.num_experts == 4
    for e in range(4):
        for kind in ("gate_proj", "up_proj", "down_proj"):
            assert f"mlp.experts.{e}.{kind}" in proj
    assert torch.equal(proj["mlp.experts.3.down_proj"], layer.mlp.experts.down_proj[3])
    assert a.experts_of(layer) is layer.mlp.experts
    assert a.expert_parameter_paths() == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert all(a.layer_weights(layer)[p] is not None for p in a.expert_parameter_paths())
    assert get_adapter(_dense("llama")).expert_parameter_paths() == []


def test_config_check_and_the_fallback_failure():
    from transformers import AutoConfig, BertConfig, BertLMHeadModel

    check_supported_config(tiny_config(UNKNOWN))  # unknown but decoder-only: passes, structure is checked later
    for mt in ("t5", "gemma3"):  # encoder-decoder; multimodal composite
        with pytest.raises(UsageError, match=f"unsupported architecture '{mt}'.*llama.*opt"):
            check_supported_config(AutoConfig.for_model(mt))
    # a causal LM whose structure has no final norm: the unsupported error, from get_adapter
    bert = BertLMHeadModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=64, is_decoder=True))
    check_supported_config(bert.config)
    with pytest.raises(UsageError, match="unsupported architecture 'bert': no decoder layer list"):
        get_adapter(bert)


# --- every method on every family --------------------------------------------------------------

@pytest.mark.parametrize("name", _runs())
@pytest.mark.parametrize("family", FAMILIES)
def test_method_save_reload_and_cached_generation(family, name, method_context, tmp_path):
    dense = _dense(family)
    opts = _options(name)
    res = run_method(name, method_context(copy.deepcopy(dense), N_REMOVE), **(opts if "+" in name else opts[name]))
    model = res.model
    a = get_adapter(model)
    assert len(res.removed_layers) >= N_REMOVE  # (streamline-iclr replaces n + 1 layers with one)
    assert model.config.num_hidden_layers == a.num_layers
    lt = a.attention_types
    if lt is not None:
        assert len(lt) == a.num_layers
    assert count_params(model) < count_params(dense)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    save_pruned(model, _tokenizer(), tmp_path / "m", res.manifest())
    back, _tok, _manifest = load_pruned(str(tmp_path / "m"))
    assert [type(l).__name__ for l in get_adapter(back).layers] == [type(l).__name__ for l in a.layers]
    assert [type(unwrap_layer(l)) for l in get_adapter(back).layers] == [type(unwrap_layer(l)) for l in a.layers]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    prompt = ids[:1, :6]  # 6 + 5 tokens: past Gemma 2/3's 4-token sliding window
    uncached = _greedy(back, prompt, False)
    assert torch.equal(_greedy(back, prompt, True), uncached)
    assert torch.equal(_greedy(model, prompt, True), uncached)  # the in-memory result (wrappers, shared slots) too
