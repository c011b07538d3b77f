"""Evaluation: perplexity (and, later, generation and the lm-eval adapter)."""

from cimattn.eval.generation import generate_text
from cimattn.eval.perplexity import (
    DEFAULT_CONTEXT,
    PerplexityResult,
    max_context,
    perplexity,
    token_nll,
    window_bounds,
)

__all__ = ["generate_text", "DEFAULT_CONTEXT", "PerplexityResult", "max_context", "perplexity", "token_nll", "window_bounds"]
