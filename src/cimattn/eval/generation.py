"""Text generation with a (hardware) model, token by token through transformers' cache."""

from __future__ import annotations

import torch


@torch.inference_mode()
def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0) -> str:
    """The continuation of `prompt` (greedy at temperature 0, else sampled with a seeded generator)."""
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
