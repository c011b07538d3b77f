"""Prune-and-recompute attention: ideal limits, oracle equality, calibration, decode = prefill, telemetry by hand."""

import math

import pytest
import torch
from torch import nn

from cimattn.adapt.thresholds import calibrate_thresholds
from cimattn.attention import IMPLEMENTATIONS
from cimattn.attention.digital import digital_attention
from cimattn.attention.prune_recompute import (
    PruneRecomputeParams,
    PruneTelemetry,
    buffer_fetches,
    collect_telemetry,
    prune_recompute_attention,
)
from cimattn.config import Buffer, HardwareConfig, PruneRecompute, Scorer, Selection
from cimattn.errors import CimattnError
from cimattn.models import convert, load_model

IDEAL = {"key_bits": None, "key_msb_bits": None, "query_bits": None, "conductance_levels": None}


def make(cfg: PruneRecompute, heads=4, kv_heads=2, head_dim=8) -> nn.Module:
    module = nn.Module()
    module.cim = PruneRecomputeParams(cfg, heads, kv_heads, head_dim, layer_idx=0)
    return module


def inputs(b=2, heads=4, kv_heads=2, t=40, s=40, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, m, d, generator=g, dtype=dtype) for n, m in ((heads, t), (kv_heads, s), (kv_heads, s)))


def padding_mask(b=2, t=40, s=40, pad=5):
    """Boolean (B, 1, T, S) causal mask; the second sequence left-padded by `pad` tokens."""
    causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    mask = causal[None, None].repeat(b, 1, 1, 1)
    mask[1, :, :, :pad] = False
    return mask


def attend(module, q, k, v, mask=None, **kw):
    return prune_recompute_attention(module, q, k, v, mask, **kw)[0]


def test_registered_with_mask_function():
    assert IMPLEMENTATIONS["prune_recompute"] == "cimattn_prune_recompute"


@pytest.mark.parametrize("selection", [
    Selection(rule="keep_rate", keep_rate=1.0),
    Selection(rule="threshold"),  # not calibrated: nothing pruned
    Selection(rule="relative"),
    Selection(rule="probability"),
    Selection(rule="top_k", top_k=10_000),
])
def test_keep_all_equals_digital_attention(selection):
    q, k, v = inputs()
    mask = padding_mask()
    out = attend(make(PruneRecompute(selection=selection)), q, k, v, mask, scaling=0.3)
    ref = digital_attention(None, q, k, v, mask, scaling=0.3)[0]
    assert out.shape == ref.shape == (2, 40, 4, 8)
    assert (out - ref).abs().max() < 1e-5


def oracle_top_k(q, k, v, mask, rate, scaling, always_recent=0):
    """Loop reference: per query row, the ceil(rate·n) largest exact logits (current + recent first), softmax over them."""
    b, h, t, _ = q.shape
    groups = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                visible = [si for si in range(k.shape[2]) if mask[bi, 0, ti, si]]
                logits = {si: float(q[bi, hi, ti] @ k[bi, hi // groups, si]) * scaling for si in visible}
                forced = [si for si in visible if 0 <= ti - si <= always_recent]
                budget = math.ceil(rate * len(visible) - 1e-9)
                rest = sorted((si for si in visible if si not in forced), key=lambda si: -logits[si])
                kept = forced + rest[: max(0, budget - len(forced))]
                weights = torch.softmax(torch.tensor([logits[si] for si in kept], dtype=q.dtype), 0)
                out[bi, hi, ti] = sum(w * v[bi, hi // groups, si] for w, si in zip(weights, kept))
    return out.transpose(1, 2)


def test_full_precision_noiseless_scorer_equals_oracle_top_k():
    q, k, v = inputs(t=24, s=24, dtype=torch.float64)
    mask = padding_mask(t=24, s=24)
    sel = Selection(rule="keep_rate", keep_rate=0.3, recent_tokens=1, sink_tokens=0)
    reram = attend(make(PruneRecompute(scorer=Scorer(kind="reram", **IDEAL), selection=sel)), q, k, v, mask, scaling=0.5)
    exact = attend(make(PruneRecompute(scorer=Scorer(kind="exact"), selection=sel)), q, k, v, mask, scaling=0.5)
    assert torch.equal(reram, exact)
    assert torch.allclose(exact, oracle_top_k(q, k, v, mask, 0.3, 0.5, always_recent=1), atol=1e-10)


def test_quantized_scorer_differs_from_oracle():
    """The test above can fail: 4-bit MSBs pick other keys than the exact scores at a low keep rate."""
    q, k, v = inputs(t=64, s=64)
    sel = Selection(rule="keep_rate", keep_rate=0.1, recent_tokens=0, sink_tokens=0)
    outs = [attend(make(PruneRecompute(scorer=s, selection=sel)), q, k, v)
            for s in (Scorer(kind="reram", key_msb_bits=2, query_bits=2, conductance_levels=4), Scorer(kind="exact"))]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_always_kept_tokens_only_at_tiny_keep_rate():
    q, k, v = inputs(b=1, t=30, s=30)
    m = make(PruneRecompute(scorer=Scorer(kind="exact"), selection=Selection(rule="keep_rate", keep_rate=1e-3, recent_tokens=2, sink_tokens=1)))
    tel = PruneTelemetry()
    m.cim.telemetry = tel
    attend(m, q, k, v)
    # query t keeps itself, t−1, t−2 and token 0 (distinct from them when t ≥ 3): Σ_t min(t+1, 4)
    expected = sum(min(t + 1, 4) for t in range(30))
    assert tel.layers[0].kept.tolist() == [expected] * 4


@pytest.mark.parametrize("rule", ["threshold", "relative", "probability"])
def test_calibration_reaches_the_target_keep_rate(rule):
    q, k, v = inputs(t=128, s=128)
    m = make(PruneRecompute(scorer=Scorer(kind="reram", comparator_offset_std=0.01, variation_std=0.02), selection=Selection(rule=rule, keep_rate=0.2)))
    m.cim.calibrate_to = 0.2
    attend(m, q, k, v)
    m.cim.calibrate_to = None
    assert not m.cim.threshold.isnan().any() and not m.cim.k_full_scale.isnan().any()
    m.cim.telemetry = tel = PruneTelemetry()
    attend(m, q, k, v)
    assert tel.summary()["keep_rate"] == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("rule", ["threshold", "relative"])
def test_layer_calibration_shares_one_threshold_and_lets_heads_differ(rule):
    """calibrate_per: layer — one threshold for all heads; the layer keeps the target, a flat-attention head keeps more."""
    q, k, v = inputs(t=128, s=128)
    q[:, 0] *= 0.05  # head 0 attends almost uniformly: its scores barely spread
    m = make(PruneRecompute(scorer=Scorer(kind="exact"), selection=Selection(rule=rule, keep_rate=0.2, calibrate_per="layer")))
    m.cim.calibrate_to = 0.2
    attend(m, q, k, v)
    m.cim.calibrate_to = None
    assert (m.cim.threshold == m.cim.threshold[0]).all()
    m.cim.telemetry = tel = PruneTelemetry()
    attend(m, q, k, v)
    assert tel.summary()["keep_rate"] == pytest.approx(0.2, abs=0.01)
    kept = tel.layers[0].kept.double()
    assert kept.max() > 1.5 * kept.min()  # per head, the keep rates differ (per-head calibration equalises them)


def test_probability_rule_keeps_keys_whose_softmax_weight_reaches_its_floor():
    """Hand-made row: logits [2, 0, 1, ln 0.6 + 2]; with threshold ln 4 a key is kept when its softmax weight over the
    visible keys is at least 1/4 — a floor on probability, not a margin below the maximum."""
    d = 4
    k = torch.zeros(1, 1, 4, d, dtype=torch.float64)
    k[0, 0, :, 0] = torch.tensor([2.0, 0.0, 1.0, math.log(0.6) + 2.0])
    q = torch.zeros(1, 1, 4, d, dtype=torch.float64)
    q[..., 0] = 1.0  # logit of key j = k_j0 (scaling 1)
    v = torch.randn(1, 1, 4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sel = Selection(rule="probability", threshold=math.log(4.0), current=False, recent_tokens=0, sink_tokens=0)
    m = make(PruneRecompute(scorer=Scorer(kind="exact"), selection=sel), heads=1, kv_heads=1)
    m.cim.telemetry = tel = PruneTelemetry()
    out = attend(m, q, k, v, scaling=1.0)
    logits = k[0, 0, :, 0]
    p = torch.softmax(logits, -1)  # the last query sees all four keys: weights .48 .06 .17 .29 (e², 1, e, 0.6·e² over 15.5)
    kept = p >= 0.25
    assert kept.tolist() == [True, False, False, True]
    ref = torch.softmax(logits.masked_fill(~kept, -math.inf), -1) @ v[0, 0]
    assert torch.allclose(out[0, 3, 0], ref, atol=1e-12)
    # the relative rule with the same margin keeps key 2 as well: 2 − 1 < ln 4 (its weight .17 is below the floor)
    m2 = make(PruneRecompute(scorer=Scorer(kind="exact"), selection=sel.model_copy(update={"rule": "relative"})), heads=1, kv_heads=1)
    ref2 = torch.softmax(logits.masked_fill(~torch.tensor([True, False, True, True]), -math.inf), -1) @ v[0, 0]
    assert torch.allclose(attend(m2, q, k, v, scaling=1.0)[0, 3, 0], ref2, atol=1e-12)


def test_fixed_threshold_is_a_comparator_on_logits():
    q, k, v = inputs(b=1, heads=2, kv_heads=2, t=16, s=16, dtype=torch.float64)
    sel = Selection(rule="threshold", threshold=0.4, recent_tokens=0, sink_tokens=0)
    m = make(PruneRecompute(scorer=Scorer(kind="exact"), selection=sel), heads=2, kv_heads=2)
    m.cim.telemetry = tel = PruneTelemetry()
    attend(m, q, k, v, scaling=0.5)
    logits = (q @ k.transpose(-1, -2)) * 0.5
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    expected = ((logits > 0.4) & causal | torch.eye(16, dtype=torch.bool)).sum(dim=(0, 2, 3))
    assert tel.layers[0].kept.tolist() == expected.double().tolist()


def test_buffer_model_hand_made_sequence():
    """Three queries keep {0,1}, {0,2}, {1,2,3}: with room for everything they fetch 2, 1, 2 tokens; with room for one
    (the latest kept key stays) 2, 2, 2; with no reuse every kept key, 2, 2, 3."""
    kept = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert buffer_fetches(kept, capacity=100).tolist() == [2, 1, 2]
    assert buffer_fetches(kept, capacity=1).tolist() == [2, 2, 2]
    assert buffer_fetches(kept, capacity=0).tolist() == [2, 2, 3]
    # a decode step continues from the previous call's last query
    assert buffer_fetches(kept[2:], capacity=100, previous=kept[1, :3]).tolist() == [2]


def test_telemetry_counts_of_keep_all_attention_by_hand():
    """Keep-all causal attention over 6 tokens, one KV head of 2 query heads, head dim 4, 1 byte per element:
    query t sees t+1 keys; with a buffer the only new key each query fetches is its own (6 tokens in all),
    without reuse all 21; a token is 2 · 4 · 1 = 8 bytes."""
    q, k, v = inputs(b=1, heads=2, kv_heads=1, t=6, s=6, d=4)
    for reuse, fetched in ((True, 6), (False, 21)):
        cfg = PruneRecompute(selection=Selection(rule="keep_rate", keep_rate=1.0), buffer=Buffer(size_kb=1.0, reuse=reuse))
        m = make(cfg, heads=2, kv_heads=1, head_dim=4)
        m.cim.telemetry = tel = PruneTelemetry()
        attend(m, q, k, v)
        s = tel.summary()
        assert tel.layers[0].visible.tolist() == [21.0, 21.0] and tel.layers[0].fetched.tolist() == [fetched]
        assert s["keep_rate"] == 1.0 and s["refetch_fraction"] == pytest.approx(fetched / 21)
        assert s["fetched_tokens_per_query"] == pytest.approx(fetched / 6)
        assert s["fetched_bytes_per_query"] == pytest.approx(fetched / 6 * 8) and s["context"] == 6
        assert s["adjacent_new_fraction"] == pytest.approx(6 / 21)  # each query's own token is new to it
        assert s["buffer_tokens"] == 1024 // 8


def test_telemetry_small_buffer_by_hand():
    """Keep-all over 6 tokens with a 2-token buffer: query t ≥ 2 refetches all but its 2 latest keys: 1, 1, 1, 2, 3, 4 = 12."""
    q, k, v = inputs(b=1, heads=1, kv_heads=1, t=6, s=6, d=4)
    cfg = PruneRecompute(selection=Selection(rule="keep_rate", keep_rate=1.0), buffer=Buffer(size_kb=16 / 1024))
    m = make(cfg, heads=1, kv_heads=1, head_dim=4)
    assert m.cim.buffer_tokens == 2
    m.cim.telemetry = tel = PruneTelemetry()
    attend(m, q, k, v)
    assert tel.layers[0].fetched.tolist() == [12.0] and tel.layers[0].new.tolist() == [6.0]


def tiny_converted(cfg: PruneRecompute, seed=0):
    model, _ = load_model("tiny-llama", seed=seed)
    convert(model, HardwareConfig(name="t", attention="prune_recompute", prune_recompute=cfg))
    return model


@pytest.mark.parametrize("scorer", [
    Scorer(kind="reram", variation_std=0.05, read_noise_std=0.01, comparator_offset_std=0.01),
    Scorer(kind="charge", conductance_levels=None, output_bits=6, variation_std=0.02),
    Scorer(kind="quest", page_tokens=4),
], ids=["reram-noisy", "charge-adc", "quest"])
def test_decode_equals_prefill(scorer):
    """Token-by-token decoding with transformers' cache gives the prefill's logits and telemetry."""
    rule = "keep_rate" if scorer.kind == "quest" else "threshold"
    model = tiny_converted(PruneRecompute(scorer=scorer, selection=Selection(rule=rule, keep_rate=0.3)))
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if rule == "threshold":
            calibrate_thresholds(model, torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3)))
        with collect_telemetry(model) as full_tel:
            full = model(input_ids=ids, use_cache=False).logits
        with collect_telemetry(model) as step_tel:
            out = model(input_ids=ids[:, :20], use_cache=True)
            logits, cache = [out.logits], out.past_key_values
            for i in range(20, 48):
                out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                cache = out.past_key_values
    assert (torch.cat(logits, dim=1) - full).abs().max() < 1e-4
    f, s = full_tel.summary(), step_tel.summary()
    assert f["keep_rate"] < 0.6  # something was pruned
    for key in ("keep_rate", "refetch_fraction", "fetched_bytes_per_query"):
        assert s[key] == pytest.approx(f[key])


def test_model_keep_all_equals_digital_model():
    model, _ = load_model("tiny-llama")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        convert(model, HardwareConfig(name="t", attention="prune_recompute",
                                      prune_recompute=PruneRecompute(selection=Selection(rule="keep_rate", keep_rate=1.0))))
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max() < 1e-4


def test_h2o_refuses_to_decode():
    q, k, v = inputs(t=1, s=10)
    m = make(PruneRecompute(scorer=Scorer(kind="h2o"), selection=Selection(rule="keep_rate")))
    with pytest.raises(CimattnError, match="whole sequence"):
        attend(m, q, k, v)


def test_h2o_keeps_heavy_hitters_and_recent_half():
    """A key every query attends to strongly is kept by H2O at a low keep rate; so are the recent half-budget keys."""
    q, k, _ = inputs(b=1, heads=1, kv_heads=1, t=40, s=40, d=8, dtype=torch.float64)
    k[0, 0, 7] = 0
    q = q.clone()
    k[0, 0, 7, 0], q[0, 0, :, 0] = 6.0, 3.0  # key 7 collects most attention from queries after it
    m = make(PruneRecompute(scorer=Scorer(kind="h2o"), selection=Selection(rule="keep_rate", keep_rate=0.2, recent_tokens=0, sink_tokens=0)),
             heads=1, kv_heads=1)
    from cimattn.attention.prune_recompute import select_keys

    exact = (q @ k.transpose(-1, -2)) * 0.35
    visible = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    keep = select_keys(m.cim, q, k, exact, visible, 0.35, (torch.ones(1), torch.ones(1)), torch.zeros(1, 1, 40, dtype=torch.float64))
    assert keep[0, 0, 39, 7] and keep[0, 0, 39, 36:].all()  # budget 8: 4 recent + heavy hitters


def test_quest_bound_is_an_upper_bound_of_page_scores():
    from cimattn.attention.prune_recompute import quest_bounds

    q, k, _ = inputs(b=1, heads=2, kv_heads=1, t=32, s=32)
    bounds, forced, _ = quest_bounds(q, k, page=8, scaling=1.0)
    exact = q @ k.transpose(-1, -2)
    assert (bounds >= exact - 1e-5).all()
    assert forced[0, 0, 9, 8:16].all() and not forced[0, 0, 9, :8].any()


def test_unconverted_module_is_refused():
    q, k, v = inputs()
    with pytest.raises(CimattnError, match="convert the model"):
        prune_recompute_attention(nn.Module(), q, k, v, None)


@pytest.mark.parametrize("rule", ["relative", "probability"])
def test_learned_thresholds_lower_the_distillation_loss(rule):
    """From thresholds set too strict, soft-mask training moves only the thresholds, lowers KL + rate penalty and
    brings the keep rate back toward its target."""
    from cimattn.adapt.thresholds import calibrate_thresholds_rate, learn_thresholds

    sel = Selection(rule=rule, keep_rate=0.3, learn_steps=8, learn_lr=0.01, learn_temperature=0.05, recent_tokens=1, sink_tokens=0)
    model = tiny_converted(PruneRecompute(scorer=Scorer(kind="reram"), selection=sel))
    teacher, _ = load_model("tiny-llama")
    batch = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    weights = [p.clone() for p in model.parameters()]
    calibrate_thresholds(model, batch, measure=False)
    layers = [m.cim for _, m in model.named_modules() if hasattr(m, "cim")]
    for cim in layers:  # too strict: fewer keys than the target
        cim.threshold += {"threshold": 0.1, "relative": -0.1, "probability": -0.3}[rule]
    start = calibrate_thresholds_rate(model, batch)["calib_keep_rate"]
    before = torch.stack([cim.threshold.clone() for cim in layers])
    losses = learn_thresholds(model, teacher, batch)
    after = torch.stack([cim.threshold for cim in layers])
    assert len(losses) == 8 and min(losses[-3:]) < losses[0]
    assert not torch.equal(before, after) and not after.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # the model's own weights stay
    end = calibrate_thresholds_rate(model, batch)["calib_keep_rate"]
    assert start < 0.25 and abs(end - 0.3) < abs(start - 0.3)


@pytest.mark.parametrize("rule", ["threshold", "relative", "probability"])
def test_model_calibration_shares_one_threshold_across_layers(rule):
    """calibrate_per: model — every layer and head gets one threshold, bisected so the whole model keeps the target."""
    from cimattn.adapt.thresholds import calibrate_thresholds

    sel = Selection(rule=rule, keep_rate=0.3, calibrate_per="model", recent_tokens=1, sink_tokens=0)
    model = tiny_converted(PruneRecompute(scorer=Scorer(kind="exact"), selection=sel))
    batch = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    reached = calibrate_thresholds(model, batch)["calib_keep_rate"]
    thresholds = torch.stack([m.cim.threshold for _, m in model.named_modules() if hasattr(m, "cim")])
    assert (thresholds == thresholds.flatten()[0]).all()
    assert reached == pytest.approx(0.3, abs=0.02)


def test_learned_thresholds_are_shifted_back_to_the_keep_rate_at_the_full_context():
    """prepare_thresholds: learn on short windows, then one offset on every threshold restores keep_rate on the whole batch;
    the learned differences between heads survive the offset."""
    from cimattn.adapt.thresholds import prepare_thresholds

    sel = Selection(rule="relative", keep_rate=0.3, calibrate_per="layer", learn_steps=4, learn_context=16,
                    learn_temperature=0.05, recent_tokens=1, sink_tokens=0)
    model = tiny_converted(PruneRecompute(scorer=Scorer(kind="reram"), selection=sel))
    teacher, _ = load_model("tiny-llama")
    batch = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(5))
    result = prepare_thresholds(model, batch, teacher)
    assert len(result["learn_loss"]) == 4
    assert result["calib_keep_rate"] == pytest.approx(0.3, abs=0.03)
    thresholds = torch.stack([m.cim.threshold for _, m in model.named_modules() if hasattr(m, "cim")])
    assert thresholds.std(-1).max() > 0  # heads of a layer no longer share one margin: learning moved them apart
