"""Perplexity: the windowing convention, agreement with transformers' own loss, truncation, errors."""

import math

import pytest
import torch

from cimattn.errors import CimattnError
from cimattn.eval import max_context, perplexity, window_bounds
from cimattn.models.loading import load_model

TEXT = b"Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day. " * 4


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


def byte_ids(n: int = len(TEXT)) -> torch.Tensor:
    return torch.tensor(list(TEXT[:n]), dtype=torch.long)


def labels_ppl(model, ids: torch.Tensor, context: int) -> float:
    """The reference: transformers' own shifted loss per window, weighted by the tokens each scores."""
    total, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context):
            window = ids[start:start + context][None]
            if window.shape[1] >= 2:
                total += model(window, labels=window).loss.item() * (window.shape[1] - 1)
                scored += window.shape[1] - 1
    return math.exp(total / scored)


def test_windows_follow_the_convention():
    assert window_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert window_bounds(9, 4) == [(0, 4), (4, 8)]  # a 1-token tail scores nothing
    assert window_bounds(3, 1024) == [(0, 3)]


def test_hand_made_case(llama):
    result = perplexity(llama, byte_ids(10), context=4)
    assert (result.windows, result.scored_tokens, result.eval_tokens, result.context) == (3, 7, 10, 4)
    assert result.ppl == pytest.approx(math.exp(result.nll_mean)) and result.ppl == pytest.approx(labels_ppl(llama, byte_ids(10), 4), rel=1e-5)
    assert result.seconds > 0 and result.tokens_per_s == pytest.approx(10 / result.seconds)


def test_perplexity_by_position_bands_the_same_tokens(llama):
    # 25 tokens in windows of 10: positions 1..9 of two windows and 1..4 of the last; bands [1], [2, 3], [4, 7], [8, 9]
    ids = byte_ids(25)
    result = perplexity(llama, ids, context=10)
    with torch.no_grad():
        nll = {p: [] for p in range(1, 10)}
        for start in (0, 10, 20):
            window = ids[start:start + 10]
            logp = torch.log_softmax(llama(window[None]).logits[0, :-1].float(), dim=-1)
            for p, token in enumerate(window[1:].tolist(), start=1):
                nll[p].append(-logp[p - 1, token].item())
    bands = [(1, 1), (2, 3), (4, 7), (8, 9)]
    assert [(b["first"], b["last"]) for b in result.by_position] == bands
    for band, (first, last) in zip(result.by_position, bands):
        values = [v for p in range(first, last + 1) for v in nll[p]]
        assert band["tokens"] == len(values) and band["ppl"] == pytest.approx(math.exp(sum(values) / len(values)), rel=1e-5)
    assert sum(b["tokens"] for b in result.by_position) == result.scored_tokens == 9 + 9 + 4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_matches_transformers_loss(name):
    model = load_model(name)[0]
    ids = byte_ids()
    result = perplexity(model, ids, context=100)
    assert result.windows == 4 and result.scored_tokens == len(ids) - 4
    assert result.ppl == pytest.approx(labels_ppl(model, ids, 100), rel=1e-5)


def test_batches_change_nothing(llama):
    one = perplexity(llama, byte_ids(), context=50, batch_size=1)
    many = perplexity(llama, byte_ids(), context=50, batch_size=3)
    assert (many.windows, many.scored_tokens) == (one.windows, one.scored_tokens)
    assert many.ppl == pytest.approx(one.ppl, rel=1e-5)


def test_eval_tokens_cuts_the_text(llama):
    ids = byte_ids()
    cut = perplexity(llama, ids, context=64, eval_tokens=150)
    assert cut.eval_tokens == 150 and cut.ppl == perplexity(llama, ids[:150], context=64).ppl
    whole = perplexity(llama, ids, context=64, eval_tokens=10 * len(ids))  # more than there is: all of it
    assert whole.eval_tokens == len(ids) and whole.ppl == perplexity(llama, ids, context=64).ppl


def test_progress_counts_every_token_read(llama):
    seen = []
    result = perplexity(llama, byte_ids(129), context=32, batch_size=2, progress=seen.append)
    assert sum(seen) == result.eval_tokens == 129 and result.windows == 4  # the 129th token is read, not scored


def test_leaves_training_mode_as_it_was(llama):
    llama.train()
    perplexity(llama, byte_ids(20), context=8)
    assert llama.training
    llama.eval()


def test_max_context():
    assert max_context(load_model("tiny-gpt2")[0]) == 4096  # from n_positions
    assert max_context(load_model("tiny-llama")[0]) == 4096  # from max_position_embeddings


@pytest.mark.parametrize("kwargs, n, message", [
    ({"context": 4097}, 100, "longer than the model's 4096 positions"),
    ({"context": 1}, 100, "too short"),
    ({}, 0, "perplexity needs at least 2"),
    ({}, 1, "perplexity needs at least 2"),
    ({"eval_tokens": 1}, 100, "too few"),
    ({"batch_size": 0}, 100, "batch size"),
])
def test_bad_input(llama, kwargs, n, message):
    with pytest.raises(CimattnError, match=message):
        perplexity(llama, byte_ids(n), **kwargs)


def test_bad_ids(llama):
    with pytest.raises(CimattnError, match="1-D LongTensor"):
        perplexity(llama, byte_ids().float())
    assert perplexity(llama, byte_ids(30)[None], context=8).eval_tokens == 30  # (1, N) is fine


def test_nan_logits_are_an_error():
    model = load_model("tiny-llama")[0]
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(CimattnError, match="NaN/Inf logits"):
        perplexity(model, byte_ids(40), context=16)


@pytest.mark.bundled
def test_smollm2_on_the_eval_corpus():
    from cimattn.data import load_text, tokenize_cached

    model, tokenizer = load_model("smollm2-135m")
    ids = tokenize_cached(tokenizer, load_text(None, "eval"), "corpus-eval")
    result = perplexity(model, ids, context=512, eval_tokens=1024)
    assert result.eval_tokens == 1024 and result.scored_tokens == 1022
    assert 5 < result.ppl < 200  # ~30 for SmolLM2-135M on Macbeth
    # the same windows through transformers' own `labels=` loss (issue 4: within 0.5 %)
    with torch.inference_mode():
        losses = [model(w[None], labels=w[None]).loss for w in ids[:1024].split(512)]
    assert result.ppl == pytest.approx(torch.stack(losses).mean().exp().item(), rel=5e-3)
