"""Model loading and conversion to hardware attention."""

from cimattn.models.convert import (
    SCALERS,
    attention_modules,
    convert,
    hardware_layers,
    hardware_parameters,
    hardware_state_dict,
    hardware_stats,
    load_hardware_state,
    recorded_stats,
    reset_noise,
    scaler_parameters,
    set_cell,
    trainable_parameters,
)
from cimattn.models.loading import (
    DEFAULT_MODEL,
    RANDOM_MODELS,
    byte_tokenizer,
    load_model,
)

__all__ = [
    "DEFAULT_MODEL", "SCALERS", "RANDOM_MODELS", "attention_modules", "byte_tokenizer", "convert", "hardware_layers",
    "hardware_parameters", "hardware_state_dict", "hardware_stats", "load_hardware_state", "load_model",
    "recorded_stats", "reset_noise", "scaler_parameters", "set_cell", "trainable_parameters",
]
