"""Adapters for the model families the harness knows by ``config.model_type``.

Module names checked against transformers 5.x (``modeling_<family>.py``). A family that is not
here is still served when its structure can be found (``structural.py``).
"""
from __future__ import annotations

from torch import nn

from harness.model.adapters.base import ModelAdapter, _get, unwrap_layer

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


class OPTAdapter(ModelAdapter):
    """OPT: ``model.decoder.layers``; learned positions; ``final_layer_norm`` (absent in the
    post-norm OPT-350m, then ``final_norm`` is None)."""

    model_types = ("opt",)
    embedding_attrs = ("embed_tokens", "embed_positions", "project_in")
    final_norm_attr = "final_layer_norm"
    norm_names = ("self_attn_layer_norm", "final_layer_norm")
    projections = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    @property
    def backbone(self):
        return self.model.model.decoder


class LlamaAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2: ``model.model.layers``, ``model.model.norm``, ``embed_tokens``."""

    model_types = ("llama", "mistral", "qwen2")
    norm_names = LLAMA_NORMS
    projections = LLAMA_PROJECTIONS

    @property
    def backbone(self):
        return self.model.model


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: Llama's layout plus per-head RMSNorms on queries and keys (``q_norm``/``k_norm``);
    optional sliding-window layers listed in ``config.layer_types``."""

    model_types = ("qwen3",)
    norm_names = LLAMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm")


class GemmaAdapter(LlamaAdapter):
    """Gemma: Llama's layout; the token embedding module multiplies by sqrt(hidden_size)
    (``embedding_scale``) and every RMSNorm computes ``x_hat * (1 + weight)`` (``norm_offset``;
    the weights are zero-centred, so a fresh norm needs the model's own init)."""

    model_types = ("gemma",)
    norm_offset = 1.0

    @property
    def embedding_scale(self) -> float:
        emb = self.embeddings[0]
        return float(getattr(emb, "scalar_embed_scale", self.hidden_size ** 0.5))


class Gemma2Adapter(GemmaAdapter):
    """Gemma 2: Gemma's quirks plus pre/post feed-forward norms, and sliding-window attention on
    the layers ``config.layer_types`` marks 'sliding_attention' (sliced with the layers, so each
    kept layer keeps its own attention type and KV-cache kind)."""

    model_types = ("gemma2",)
    norm_names = LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class Gemma3TextAdapter(Gemma2Adapter):
    """Gemma 3 (text-only ``Gemma3ForCausalLM``): Gemma 2's layout plus q/k norms; the decoder
    layer carries its own ``layer_idx``; rotary embeddings per attention type."""

    model_types = ("gemma3_text",)
    norm_names = Gemma2Adapter.norm_names + ("self_attn.q_norm", "self_attn.k_norm")


class PhiAdapter(LlamaAdapter):
    """Phi (1, 1.5, 2): one LayerNorm per layer (parallel attention and MLP), attention output
    ``dense``, MLP ``fc1``/``fc2``, optional q/k LayerNorms, and the final norm named
    ``final_layernorm``."""

    model_types = ("phi",)
    final_norm_attr = "final_layernorm"
    norm_names = ("input_layernorm", "self_attn.q_layernorm", "self_attn.k_layernorm")
    projections = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")


class Phi3Adapter(LlamaAdapter):
    """Phi-3: fused projections, ``self_attn.qkv_proj`` (q, k, v rows stacked) and
    ``mlp.gate_up_proj`` (gate rows, then up rows). LoRA targets the fused modules;
    ``layer_projections`` gives q/k/v and gate/up as separate views."""

    model_types = ("phi3",)
    projections = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def _split_fused(self, name, weight):
        module, _, leaf = name.rpartition(".")
        prefix = module + "." if module else ""
        cfg = self.config
        if leaf == "qkv_proj":
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            q = cfg.num_attention_heads * head_dim
            kv = cfg.num_key_value_heads * head_dim
            return {prefix + "q_proj": weight[:q], prefix + "k_proj": weight[q:q + kv],
                    prefix + "v_proj": weight[q + kv:q + 2 * kv]}
        if leaf == "gate_up_proj":
            gate, up = weight.chunk(2, dim=0)
            return {prefix + "gate_proj": gate, prefix + "up_proj": up}
        return {name: weight}


class MixtralAdapter(LlamaAdapter):
    """Mixtral: Llama's attention with a sparse-MoE block as the MLP: a router (``mlp.gate``)
    and ``num_local_experts`` experts stored as stacked tensors (``mlp.experts.gate_up_proj``
    ``(E, 2I, d)``, gate rows first, and ``mlp.experts.down_proj`` ``(E, d, I)``).
    ``layer_weights`` includes the router and every expert; ``layer_projections`` gives each
    expert's gate/up/down as views (``mlp.experts.3.up_proj``). LoRA's default targets are the
    attention projections (the experts are not ``nn.Linear`` modules; ``expert_parameters``
    names them for PEFT's ``target_parameters``)."""

    model_types = ("mixtral",)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    experts_attr = "mlp.experts"
    expert_parameters = ("gate_up_proj", "down_proj")

    @property
    def num_experts(self) -> int:
        return int(self.config.num_local_experts)

    def experts_of(self, layer: nn.Module) -> nn.Module:
        return _get(unwrap_layer(layer), self.experts_attr)

    def _split_fused(self, name, weight):
        module, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj" and module.startswith(self.experts_attr + "."):
            gate, up = weight.chunk(2, dim=0)
            return {f"{module}.gate_proj": gate, f"{module}.up_proj": up}
        return {name: weight}


class GPTNeoXAdapter(ModelAdapter):
    """GPT-NeoX (Pythia): ``gpt_neox.layers``, ``embed_in``, ``final_layer_norm``, fused
    ``query_key_value`` (interleaved per head)."""

    model_types = ("gpt_neox",)
    attention_attr = "attention"
    embedding_attrs = ("embed_in",)
    final_norm_attr = "final_layer_norm"
    norm_names = LLAMA_NORMS
    projections = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

    @property
    def backbone(self):
        return self.model.gpt_neox


FAMILY_ADAPTERS: tuple[type[ModelAdapter], ...] = (
    OPTAdapter, LlamaAdapter, Qwen3Adapter, GemmaAdapter, Gemma2Adapter, Gemma3TextAdapter,
    PhiAdapter, Phi3Adapter, MixtralAdapter, GPTNeoXAdapter,
)

