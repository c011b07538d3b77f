"""What the hardware is asked to do: the model's attention shape, the context, and a run's telemetry."""

from __future__ import annotations

from dataclasses import dataclass, fields

from cimattn.errors import CimattnError


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of a decoder: layers × query heads (sharing kv_heads K/V heads) × head_dim."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self):
        for f in ("layers", "heads", "kv_heads", "head_dim"):
            if getattr(self, f) < 1:
                raise CimattnError(f"model shape {self.name}: {f} must be ≥ 1, got {getattr(self, f)}")
        if self.heads % self.kv_heads:
            raise CimattnError(f"model shape {self.name}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config, name: str = "model") -> ModelShape:
        """From a transformers config (Llama/Qwen/Mistral names or GPT-2's n_layer / n_head / n_embd)."""
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if not (layers and heads and hidden):
            raise CimattnError(f"model {name}: its config names no layer / head / hidden size; cannot count attention operations")
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(name, int(layers), int(heads), int(kv), int(head_dim))


# Reference shapes for the context-length plot; from each model's published config.
SHAPES = {
    "gpt2": ModelShape("GPT-2 small", 12, 12, 12, 64),  # openai-community/gpt2 config.json
    "gpt2-xl": ModelShape("GPT-2 XL", 48, 25, 25, 64),  # openai-community/gpt2-xl config.json
    "llama-3-8b": ModelShape("Llama-3-8B", 32, 32, 8, 128),  # meta-llama/Meta-Llama-3-8B config.json
    "smollm2-135m": ModelShape("SmolLM2-135M", 30, 9, 3, 64),  # HuggingFaceTB/SmolLM2-135M config.json
}


@dataclass(frozen=True)
class Telemetry:
    """What a real prune-and-recompute run measured; any field left None falls back to the table's default.

    keep_rate: fraction of causal keys kept per query; refetch_fraction: fraction of the
    sequence fetched anew between adjacent queries; fetched_bytes_per_query: measured
    off-chip bytes per query (overrides the refetch model); context: tokens the telemetry
    was taken at; window_occupancy: fraction of the gain-cell window holding tokens.
    """

    keep_rate: float | None = None
    refetch_fraction: float | None = None
    fetched_bytes_per_query: float | None = None
    context: int | None = None
    window_occupancy: float | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> Telemetry:
        if not data:
            return cls()
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}  # other keys are the run's own business
        for k, v in values.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise CimattnError(f"telemetry '{k}' must be a non-negative number, got {v!r}")
        for k in ("keep_rate", "refetch_fraction", "window_occupancy"):
            if values.get(k, 0) > 1:
                raise CimattnError(f"telemetry '{k}' is a fraction in [0, 1], got {values[k]}")
        return cls(**values)
