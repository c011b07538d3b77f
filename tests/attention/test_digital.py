"""The `digital` attention equals each model's own eager attention (issue 4: logits within 1e-5)."""

import pytest
import torch

from cimattn.attention import IMPLEMENTATIONS
from cimattn.models import load_model


def logits(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_digital_equals_eager(name):
    model, tokenizer = load_model(name)
    tokenizer.padding_side = "left"
    batch = tokenizer(["Is this the real life?", "Is this just fantasy, caught in a landslide?"], return_tensors="pt", padding=True)
    eager = logits(model, "eager", **batch)
    digital = logits(model, IMPLEMENTATIONS["digital"], **batch)
    real = batch.attention_mask.bool()  # padded positions' logits are meaningless
    assert (eager - digital)[real].abs().max() < 1e-5


def test_digital_sliding_window_sees_only_recent_keys():
    from cimattn.attention.digital import digital_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    module = torch.nn.Module()
    out, _ = digital_attention(module, q, k, v, None, scaling=0.5, sliding_window=2)
    # query t attends to keys t−1 and t only
    for t in range(6):
        lo = max(0, t - 1)
        p = torch.softmax(q[0, :, t : t + 1] @ k[0, :, lo : t + 1].transpose(-1, -2) * 0.5, dim=-1)
        assert torch.allclose(out[0, t], (p @ v[0, :, lo : t + 1])[:, 0], atol=1e-6)


@pytest.mark.bundled
def test_digital_equals_eager_on_the_bundled_model():
    model, tokenizer = load_model("smollm2-135m")
    batch = tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")
    assert (logits(model, "eager", **batch) - logits(model, IMPLEMENTATIONS["digital"], **batch)).abs().max() < 1e-5


def test_all_finite_sees_nan_and_inf_even_where_the_sum_overflows():
    from cimattn.attention.common import all_finite

    x = torch.ones(4, 5)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 3] = bad
        assert not all_finite(y)
    big = torch.full((8,), 3e38)  # finite elements whose fp32 sum overflows
    assert all_finite(big) and not all_finite(torch.cat([big, torch.tensor([float("nan")])]))
    assert all_finite(torch.full((100,), 60000.0, dtype=torch.float16))  # summed in fp32
