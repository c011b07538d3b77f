"""load_model: tiny configs, a local directory through real from_pretrained, clear errors."""

import pytest
import torch

from cimattn.errors import CimattnError
from cimattn.models import load_model


def test_local_directory_round_trip(tmp_path):
    model, tokenizer = load_model("tiny-qwen2", seed=7)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tokenizer_again = load_model(str(tmp_path))
    ids = tokenizer("a local model", return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer_again("a local model", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-6)


def test_tiny_models_are_seeded():
    a, _ = load_model("tiny-llama", seed=1)
    b, _ = load_model("tiny-llama", seed=1)
    c, _ = load_model("tiny-llama", seed=2)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize("name", ["no-such-model", "./missing/dir", "owner/not-on-this-offline-machine"])
def test_unknown_models_are_clear(name):
    with pytest.raises(CimattnError, match="model"):
        load_model(name)
