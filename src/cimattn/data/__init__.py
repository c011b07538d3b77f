"""Text for calibration and evaluation: the bundled corpus, user files, HF datasets, cached token ids."""

from cimattn.data.corpus import (
    EVAL_WORKS,
    corpus_text,
    corpus_works,
    fetch_corpus,
    load_text,
    strip_gutenberg,
    tokenize_cached,
)

__all__ = ["EVAL_WORKS", "corpus_text", "corpus_works", "fetch_corpus", "load_text", "strip_gutenberg", "tokenize_cached"]
