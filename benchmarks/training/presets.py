"""Model and optimisation presets.

Every hidden and intermediate size is a multiple of 64, so 2:4 and 4:8 masks and block-restricted permutations
fit every Linear input; head_dim >= 16. The presets differ on purpose in the attention layout (GQA vs MHA) and
in embedding tying, so the benchmarks exercise both code paths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    batch_size: int
    max_steps: int
    learning_rate: float
    warmup_steps: int

    def model_shape(self) -> dict:
        shape = asdict(self)
        for key in ("batch_size", "max_steps", "learning_rate", "warmup_steps"):
            shape.pop(key)
        return shape


PRESETS: dict[str, Preset] = {
    # ~2.1M parameters, GQA 4:2, tied embeddings; ~30 min on one busy CPU core.
    "llama-2m": Preset(128, 384, 8, 4, 2, True, batch_size=16, max_steps=900, learning_rate=2e-3, warmup_steps=50),
    # ~10.6M parameters, multi-head attention, untied embeddings; ~30 min on one busy CPU core.
    "llama-10m": Preset(256, 768, 10, 8, 8, False, batch_size=8, max_steps=550, learning_rate=1.5e-3, warmup_steps=50),
    # ~30M parameters, GQA 8:4, head_dim 64, tied embeddings; too slow for 2 CPU threads (use --device cuda).
    "llama-30m": Preset(512, 1536, 9, 8, 4, True, batch_size=16, max_steps=3000, learning_rate=1e-3, warmup_steps=100),
    # For the smoke test only.
    "tiny": Preset(64, 128, 2, 4, 2, True, batch_size=4, max_steps=8, learning_rate=1e-2, warmup_steps=2),
}


def validate_shape(preset: Preset) -> None:
    """Reject shapes that N:M pruning or the permutation sites cannot use, naming the offending field."""
    if preset.hidden_size % 64 or preset.intermediate_size % 64:
        raise ValueError("hidden_size and intermediate_size must be multiples of 64 (2:4 and 4:8 everywhere)")
    if preset.hidden_size % preset.num_attention_heads:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    if preset.hidden_size // preset.num_attention_heads < 16:
        raise ValueError("head_dim = hidden_size / num_attention_heads must be at least 16")
    if preset.num_attention_heads % preset.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
