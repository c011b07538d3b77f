"""Model loading and conversion to hardware attention."""

from cimattn.models.loading import DEFAULT_MODEL, TINY_CONFIGS, byte_tokenizer, load_model

__all__ = ["DEFAULT_MODEL", "TINY_CONFIGS", "byte_tokenizer", "load_model"]
