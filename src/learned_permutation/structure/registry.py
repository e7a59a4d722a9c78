"""Architecture mappings: where each supported model keeps the modules a permutation site touches.

A mapping is data, not code: adding an architecture means adding one entry to
`SUPPORTED_ARCHITECTURES` whose module paths and config attribute names describe it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedArchitectureError(ValueError):
    """The model has no entry in the architecture registry."""


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of a decoder's attention, read from the model config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def query_groups(self) -> int:
        """Query heads reading each KV head (1 for multi-head attention, >1 under GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ArchitectureMapping:
    """Module paths of one decoder-only model class.

    `embed_tokens`, `decoder_layers`, `final_norm` and `lm_head` are relative to the model;
    every other path is relative to one decoder layer. Defaults describe the Llama layout,
    which Mistral, Qwen2 and Qwen3 share.
    """

    class_name: str
    model_type: str
    embed_tokens: str = "model.embed_tokens"
    decoder_layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # residual site: Linear modules that read the hidden state (input columns permuted) ...
    residual_readers: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    )
    # ... Linear modules that write into it (output rows and biases permuted) ...
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # ... and the per-layer norms acting elementwise on it
    residual_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # attn_vo site: value projection rows feed the attention output projection's columns
    value_proj: str = "self_attn.v_proj"
    attention_output_proj: str = "self_attn.o_proj"
    # mlp site: gate/up rows feed down_proj's columns
    mlp_producers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_consumer: str = "mlp.down_proj"
    # config attributes of the attention head layout
    num_heads_attr: str = "num_attention_heads"
    num_kv_heads_attr: str = "num_key_value_heads"
    head_dim_attr: str = "head_dim"

    def attention_shape(self, config) -> AttentionShape:
        """Head layout from `config`; head_dim defaults to hidden_size // num_heads (Qwen2 has no head_dim)."""
        num_heads = getattr(config, self.num_heads_attr)
        num_kv_heads = getattr(config, self.num_kv_heads_attr, None) or num_heads
        head_dim = getattr(config, self.head_dim_attr, None) or config.hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{self.class_name}: {num_heads} query heads cannot be shared evenly by "
                f"{num_kv_heads} KV heads; the config is inconsistent."
            )
        return AttentionShape(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)


SUPPORTED_ARCHITECTURES: dict[str, ArchitectureMapping] = {
    mapping.class_name: mapping
    for mapping in (
        ArchitectureMapping("LlamaForCausalLM", "llama"),
        ArchitectureMapping("MistralForCausalLM", "mistral"),
        # Qwen2's q/k/v biases: v's bias is permuted with v's rows; q/k outputs are never permuted.
        ArchitectureMapping("Qwen2ForCausalLM", "qwen2"),
        # Qwen3's q_norm/k_norm act on q/k's head_dim, which no site permutes.
        ArchitectureMapping("Qwen3ForCausalLM", "qwen3"),
    )
}


def mapping_for(model: torch.nn.Module) -> ArchitectureMapping:
    """The registry entry for `model`'s class, or an error that lists what is supported."""
    return mapping_for_class(type(model).__name__, getattr(getattr(model, "config", None), "model_type", "unknown"))


def mapping_for_config(config) -> ArchitectureMapping:
    """The registry entry for the class a transformers config names (``architectures[0]``), so a
    model folder can be checked from its config.json before the weights are loaded."""
    architectures = getattr(config, "architectures", None) or ["(none in config.json)"]
    return mapping_for_class(architectures[0], getattr(config, "model_type", "unknown"))


def mapping_for_class(class_name: str, model_type: str) -> ArchitectureMapping:
    mapping = SUPPORTED_ARCHITECTURES.get(class_name)
    if mapping is None:
        supported = ", ".join(f"{m.class_name} ({m.model_type})" for m in SUPPORTED_ARCHITECTURES.values())
        raise UnsupportedArchitectureError(
            f"learned-permutation has no architecture mapping for {class_name} "
            f"(model_type {model_type!r}). Supported: {supported}. "
            "Add an ArchitectureMapping to learned_permutation.structure.registry.SUPPORTED_ARCHITECTURES "
            "if the model shares one of these layouts."
        )
    return mapping
