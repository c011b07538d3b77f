"""Gain-cell attention against references written directly from the equations of shared/PAPERS.md §1."""

import math

import pytest
import torch
from torch import nn

import cimattn.attention.gaincell as gca
import cimattn.attention.gaincell_decode as gca_decode
from cimattn.attention import IMPLEMENTATIONS
from cimattn.attention.gaincell import GainCellParams, gaincell_attention
from cimattn.config import GainCell, Leakage, Noise, Quantizer, Scaler
from cimattn.errors import CimattnError
from cimattn.physics import max_query_block

# PAPERS.md §1, Eq. 4: the ten C_ij for (i, j) = (0,0),(0,1),(0,2),(0,3),(1,0),(1,1),(1,2),(2,0),(2,1),(3,0)
C_IJ = [0.17393044, 0.15653739, 0.14088365, 0.12679529, 5.51975209, 4.96777688, 4.4709992, -1.44776001, -1.30298401, 46.05483778]
POWERS = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0)]
V_IN, Y_MID, SLOPE = 0.9, 0.45, 19.3


def physics(**overrides) -> GainCell:
    """A small array (W = 8, 2 tiles of 4) with strong leakage and gains that exercise every clamp."""
    base = dict(
        window_tokens=8, tokens_per_array=4, score_scale=0.125, av_tile_scale=0.125,
        leakage=Leakage(tau_s=20 * 8e-7, step_time_s=8e-7),  # 0.05 per token
    )
    return GainCell(**{**base, **overrides})


def make_module(cfg: GainCell, heads=4, kv_heads=2, head_dim=3, random_scalers=True, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    module = nn.Module()
    module.cim = GainCellParams(cfg, heads, kv_heads, head_dim, layer_idx=0)
    if random_scalers:
        with torch.no_grad():
            for scaler in module.cim.scalers.values():
                if hasattr(scaler, "a"):  # the per-head HardSigmoid offsets (head_offsets) have only b
                    scaler.a.uniform_(0.6, 1.4)
                scaler.b.add_(0.1 * torch.randn_like(scaler.b))
    return module.double()


def inputs(b=2, heads=4, kv_heads=2, t=20, s=20, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = 0.5 + 0.4 * torch.randn(b, heads, t, d, generator=g, dtype=torch.float64)
    k = 0.3 * torch.randn(b, kv_heads, s, d, generator=g, dtype=torch.float64)
    v = 0.3 * torch.randn(b, kv_heads, s, d, generator=g, dtype=torch.float64)
    return q, k, v


def reference(module, q, k, v, key_valid=None, offsets=None):
    """Loops over batch, heads, queries and keys, straight from the equations (float64).

    key_valid (B, S) marks non-padding keys; offsets (B,) gives ring position = cache index − offset.
    """
    cim, cfg = module.cim, module.cim.config
    c = [0.0] * 4
    for (i, j), cij in zip(POWERS, C_IJ):
        c[i] += cij * V_IN**j

    def f(x, u, dec):  # one cell: Eq. 4 with leakage on the stored deviation, or the linear cell
        if cim.cell == "linear":
            return SLOPE * x * u * dec
        return x * sum(ci * (u * dec) ** i for i, ci in enumerate(c))

    def quant(x, qz):  # every Leroux range holds 0: step · round(x / step) after the clamp
        x = x.clamp(qz.low, qz.high)
        step = None if qz.levels is None else (qz.high - qz.low) / (qz.levels - 1)
        return x if step is None else step * torch.round(x / step)

    sc = {n: (cim.scalers[n].a.detach(), cim.scalers[n].b.detach()) for n in ("q", "k", "v", "out")}
    head_offset = cim.scalers["score"].b.detach() if cfg.head_offsets else torch.zeros(q.shape[1], dtype=q.dtype)
    b_, h_, t_, d_ = q.shape
    hkv, s_ = k.shape[1], k.shape[2]
    w, tpa, rate = cfg.window_tokens, cfg.tokens_per_array, cfg.leakage.rate_per_token
    out = torch.zeros_like(q)
    for b in range(b_):
        off = 0 if offsets is None else int(offsets[b])
        for h in range(h_):
            kv = h // (h_ // hkv)
            qq = quant(sc["q"][0][h] * q[b, h] + sc["q"][1][h], cfg.q)
            kk = quant(sc["k"][0][kv] * k[b, kv] + sc["k"][1][kv], cfg.k)
            vv = quant(sc["v"][0][kv] * v[b, kv] + sc["v"][1][kv], cfg.v)
            for t in range(t_):
                p = s_ - t_ + t
                tiles: dict[int, torch.Tensor] = {}
                seen = sum(1 for s in range(max(0, p - w + 1), p + 1) if key_valid is None or key_valid[b, s])
                lowered = cfg.offset_per_doubling * math.log2(max(seen / cfg.offset_reference_keys, 1.0))
                for s in range(max(0, p - w + 1), p + 1):
                    if key_valid is not None and not key_valid[b, s]:
                        continue
                    dec, slot = math.exp(-rate * (p - s)), (s - off) % w
                    gk = 1.0 if cim.k_gain is None else cim.k_gain[kv, slot]
                    gv = torch.ones(d_ + 1, dtype=q.dtype) if cim.v_gain is None else cim.v_gain[kv, slot]
                    score = (f(qq[t], kk[s] - Y_MID, dec) * gk).sum()
                    a = (cfg.score_scale * score + cfg.score_offset - lowered + head_offset[h]).clamp(0, 1)
                    charge = f(a, vv[s] - Y_MID, dec) * gv[:d_]
                    if cfg.normalize:  # the all-ones column, stored at full scale
                        charge = torch.cat([charge, (f(a, cfg.v.high - Y_MID, dec) * gv[d_]).reshape(1)])
                    tiles[slot // tpa] = tiles.get(slot // tpa, 0) + charge
                o = sum((quant(cfg.av_tile_scale * x, cfg.av_out) for x in tiles.values()), torch.zeros(1, dtype=q.dtype))
                if cfg.normalize:
                    o = o[:d_] / o[d_] if o[d_] > 0 else torch.zeros(d_, dtype=q.dtype)
                out[b, h, t] = sc["out"][0][h] * o + sc["out"][1][h]
    return out


def run(module, q, k, v, mask=None, **kwargs):
    out, weights = gaincell_attention(module, q, k, v, mask, **kwargs)
    assert weights is None
    return out.transpose(1, 2)  # (B, H, T, D)


def test_registered_as_cimattn_gaincell():
    assert IMPLEMENTATIONS["gaincell"] == "cimattn_gaincell"


def test_the_registered_function_simulates_the_arrays_in_fp32_under_the_digital_layers_autocast():
    from transformers import AttentionInterface

    registered = AttentionInterface()["cimattn_gaincell"]
    module = make_module(physics()).float()
    q, k, v = (x.float() for x in inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = registered(module, q, k, v, None)[0]
    # bit for bit the fp32 result: no matmul inside was cast to bf16 (its 8-bit mantissa would move the scores by ~1e-3)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, gaincell_attention(module, q, k, v, None)[0])


def test_under_autocast_only_the_surrogate_gradients_products_take_its_precision():
    """The training signal of the arrays (the linear cell's gradient, an approximation already) runs at the digital
    layers' bf16; their values stay fp32."""
    from transformers import AttentionInterface

    registered = AttentionInterface()["cimattn_gaincell"]
    module = make_module(physics(), head_dim=8).float()  # cell: nonlinear, cell_gradient: linear (the surrogate)

    def value_and_grads(autocast: bool):
        q, k, v = (x.float().requires_grad_() for x in inputs(d=8))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = registered(module, q, k, v, None)[0]
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return out.detach(), torch.cat([x.grad.flatten() for x in (q, k, v)])

    fp32, grad32 = value_and_grads(False)
    bf16, grad16 = value_and_grads(True)
    assert torch.equal(bf16, fp32)
    assert not torch.equal(grad16, grad32)  # the products were rounded to bf16 …
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.999  # … and the gradient is the same one


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("kind", ["nonlinear", "linear"])
def test_matches_loop_reference_with_ring_buffer_and_gqa(kind, grad):
    """Quantisers, scalers, leakage, HardSigmoid, per-tile read-out, 20 tokens through an 8-token ring, 4 heads on 2 KV heads."""
    module = make_module(physics(cell=kind))
    q, k, v = inputs()
    with torch.set_grad_enabled(grad):
        got = run(module, q, k, v)
    assert torch.allclose(got, reference(module, q, k, v), atol=1e-10)
    assert got.abs().max() > 0.1 and got.std() > 0.05  # the test would see a wrong path


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_matches_loop_reference_with_variability_and_normalisation(grad):
    cfg = physics(noise=Noise(cell_variability_std=0.1, seed=5), normalize=True, av_tile_scale=0.02)
    module = make_module(cfg)
    assert module.cim.k_gain.shape == (2, 8, 3) and module.cim.v_gain.shape == (2, 8, 4)
    q, k, v = inputs(seed=2)
    with torch.set_grad_enabled(grad):
        got = run(module, q, k, v)
    assert torch.allclose(got, reference(module, q, k, v), atol=1e-10)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_matches_loop_reference_with_an_offset_that_falls_with_the_keys_seen(grad):
    """offset_per_doubling: the query that sees n > 2 keys has its HardSigmoid offset lowered by 0.3·log2(n / 2)."""
    module = make_module(physics(offset_per_doubling=0.3, offset_reference_keys=2, score_offset=0.3))
    q, k, v = inputs(seed=3)
    with torch.set_grad_enabled(grad):
        got = run(module, q, k, v)
    assert torch.allclose(got, reference(module, q, k, v), atol=1e-10)
    plain = make_module(physics(score_offset=0.3))
    assert not torch.allclose(got[:, :, 2:], run(plain, q, k, v)[:, :, 2:], atol=1e-3)  # from the third query on
    assert torch.allclose(got[:, :, :2], run(plain, q, k, v)[:, :, :2], atol=1e-12)  # one and two keys: the paper's offset


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_matches_loop_reference_with_per_head_offsets(grad):
    """head_offsets: each query head adds its own trainable offset b_h to the HardSigmoid input."""
    module = make_module(physics(head_offsets=True, offset_per_doubling=0.3, offset_reference_keys=2))
    offsets = module.cim.scalers["score"].b
    assert offsets.shape == (4,) and offsets.std() > 0.02  # make_module drew them
    q, k, v = inputs(seed=3)
    with torch.set_grad_enabled(grad):
        got = run(module, q, k, v)
    assert torch.allclose(got, reference(module, q, k, v), atol=1e-10)
    with torch.no_grad():
        offsets.zero_()
    assert not torch.allclose(got, run(module, q, k, v), atol=1e-3)


def test_ideal_limit_is_digital_hardsigmoid_attention():
    """No rounding, no leakage, no noise, linear cell: the arrays compute exact HardSigmoid attention.

    Reference: out[t] = Σ_{s ≤ t, t−s < W} clamp(S/80, 0, 1) · 19.3 · (v_s − 0.45) / 40 with
    S = Σ_d 19.3 · q_d · (k_sd − 0.45); inputs inside the clamp ranges, tiles of 4 tokens never saturate.
    """
    unq = dict(levels=None)
    cfg = GainCell(
        window_tokens=8, tokens_per_array=4, cell="linear", leakage=Leakage(tau_s=None),
        q=Quantizer(low=0, high=1, **unq), k=Quantizer(low=0, high=0.9, **unq), v=Quantizer(low=0, high=0.9, **unq),
        av_out=Quantizer(low=-1, high=1, **unq),
    )
    module = make_module(cfg, head_dim=5, random_scalers=False).float()
    g = torch.Generator().manual_seed(0)
    t = 12
    q = torch.rand(2, 4, t, 5, generator=g)
    k, v = torch.rand(2, 2, t, 5, generator=g) * 0.9 - 0.45, torch.rand(2, 2, t, 5, generator=g) * 0.9 - 0.45  # scaler b = 0.45
    got = run(module, q, k, v)
    kk, vv = k.repeat_interleave(2, dim=1) + 0.45, v.repeat_interleave(2, dim=1) + 0.45  # (B, H, S, D)
    scores = 19.3 * q @ (kk - 0.45).transpose(-1, -2)
    age = torch.arange(t)[:, None] - torch.arange(t)[None, :]
    a = torch.where((age >= 0) & (age < 8), (scores / 80).clamp(0, 1), 0.0)
    expected = a @ (19.3 * (vv - 0.45)) / 40
    assert torch.allclose(got, expected, atol=1e-5)
    assert expected.abs().max() > 0.05


def test_per_tile_clamp_happens_before_the_digital_sum():
    """Hand case: A = 1 on all keys; tile 0 holds u = +0.45, tile 1 u = −0.2 (W = 8, 4 tokens per tile).

    Each key adds 19.3·u·(1/20): tile 0 reads clamp(4 · 0.43425) = 1, tile 1 reads 4 · (−0.193) = −0.772,
    so the query at position 7 gets 1 − 0.772 = 0.228 — clamping the total would give 0.965.
    """
    unq = dict(levels=None)
    cfg = GainCell(
        window_tokens=8, tokens_per_array=4, cell="linear", leakage=Leakage(tau_s=None), score_scale=1.0,
        av_tile_scale=1 / 20, q=Quantizer(low=0, high=1, **unq), k=Quantizer(low=0, high=0.9, **unq),
        v=Quantizer(low=0, high=0.9, **unq), av_out=Quantizer(low=-1, high=1, **unq),
    )
    module = make_module(cfg, heads=1, kv_heads=1, head_dim=1, random_scalers=False)
    q = torch.ones(1, 1, 8, 1, dtype=torch.float64)
    k = torch.full((1, 1, 8, 1), 0.45, dtype=torch.float64)  # stored 0.9 V: score 19.3 · 0.45 → A = 1
    v = torch.tensor([0.45] * 4 + [-0.2] * 4, dtype=torch.float64).view(1, 1, 8, 1)
    out = run(module, q, k, v)[0, 0, :, 0]
    per_key_0, per_key_1 = 19.3 * 0.45 / 20, 19.3 * -0.2 / 20
    assert out[3].item() == pytest.approx(min(1.0, 4 * per_key_0))
    assert out[5].item() == pytest.approx(1.0 + 2 * per_key_1)
    assert out[7].item() == pytest.approx(1.0 + 4 * per_key_1)  # 0.228
    assert out[7].item() != pytest.approx(min(1.0, 4 * (per_key_0 + per_key_1)))


def test_query_heads_of_a_group_share_the_kv_arrays():
    """GQA: 2 query heads on 1 KV head equal 2 heads on 2 identical KV heads with the same k, v scalers."""
    cfg = physics()
    shared, separate = make_module(cfg, heads=2, kv_heads=1), make_module(cfg, heads=2, kv_heads=2)
    with torch.no_grad():
        for name in ("q", "out"):
            separate.cim.scalers[name].load_state_dict(shared.cim.scalers[name].state_dict())
        for name in ("k", "v"):
            for p in ("a", "b"):
                getattr(separate.cim.scalers[name], p).copy_(getattr(shared.cim.scalers[name], p).expand(2))
    q, k, v = inputs(heads=2, kv_heads=1)
    assert torch.allclose(run(shared, q, k, v), run(separate, q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1)), atol=1e-12)


@pytest.mark.parametrize("extra", [{}, {"offset_per_doubling": 0.3, "offset_reference_keys": 2}], ids=["paper", "offset-per-doubling"])
def test_left_padding_with_position_ids_equals_the_unpadded_sequence(extra):
    """Sequence 0 is left-padded by 3 (not a multiple of the 4-token tile): its ring starts at its first real token
    (and padding keys do not count among the keys a query sees)."""
    cfg = physics(noise=Noise(cell_variability_std=0.1), **extra)
    module = make_module(cfg)
    q, k, v = inputs(t=14, s=14)
    pad = 3
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[0, :pad] = False
    causal = torch.ones(14, 14, dtype=torch.bool).tril()
    mask = causal[None, None] & valid[:, None, None, :]  # (B, 1, T, S), as transformers' mask function gives
    position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)  # as generate() counts positions
    got = run(module, q, k, v, mask, position_ids=position_ids)
    assert torch.allclose(got, reference(module, q, k, v, valid, offsets=torch.tensor([pad, 0])), atol=1e-10)
    alone = run(module, q[:1, :, pad:], k[:1, :, pad:], v[:1, :, pad:])  # the same sequence without padding
    assert torch.allclose(got[:1, :, pad:], alone, atol=1e-10)
    assert torch.isfinite(got).all()


def test_padding_content_is_ignored():
    module = make_module(physics())
    q, k, v = inputs(t=10, s=10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    mask = torch.ones(10, 10, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :4], v2[1, :, :4] = 5.0, -5.0
    a, b = run(module, q, k, v, mask), run(module, q, k2, v2, mask)
    assert torch.allclose(a[:, :, 4:], b[:, :, 4:], atol=1e-12)


def test_query_blocks_give_the_same_result(monkeypatch):
    """Queries processed in blocks (memory bound) equal one block."""
    module = make_module(physics(noise=Noise(cell_variability_std=0.1)))
    q, k, v = inputs(t=20, s=20)
    whole = run(module, q, k, v)
    monkeypatch.setattr(gca, "SCORE_ELEMENTS_PER_BLOCK", 2 * 4 * 3 * 20)  # 3 queries a block
    assert torch.allclose(run(module, q, k, v), whole, atol=1e-12)


def test_fast_leakage_splits_queries_into_finite_blocks():
    """τ of a quarter token step (silicon-like extreme): queries go in blocks of max_query_block, still exact."""
    cfg = physics(leakage=Leakage(tau_s=2e-7, step_time_s=8e-7))  # decay e^-4 per token
    assert max_query_block(cfg) == 5
    module = make_module(cfg)
    q, k, v = inputs(t=20, s=20)
    out = run(module, q, k, v)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, reference(module, q, k, v), atol=1e-10)


def test_read_noise_is_seeded_and_fresh_per_read():
    module = make_module(physics(noise=Noise(read_std=0.02, seed=7)))
    q, k, v = inputs()
    first, second = run(module, q, k, v), run(module, q, k, v)
    assert not torch.allclose(first, second)  # every read draws new noise
    module.cim.reset_noise()
    assert torch.equal(run(module, q, k, v), first)  # same seed, same inputs → same output
    clean = run(make_module(physics()), q, k, v)
    assert 0 < (first - clean).abs().mean() < 0.5


def test_stats_are_per_head_moments_after_each_scaler():
    """mean and std of a·x + b before the clamp, over batch, tokens and head dims (PAPERS.md §1, adaptation)."""
    module = make_module(physics())
    q, k, v = inputs()
    run(module, q, k, v)
    assert module.cim.stats == {}
    module.cim.record_stats = True
    out = run(module, q, k, v)
    stats = module.cim.stats
    assert set(stats) == {"q", "k", "v", "out"}
    sq = module.cim.scalers["q"]
    x = sq.a.detach()[:, None, None] * q + sq.b.detach()[:, None, None]  # (B, H, T, D)
    assert torch.allclose(stats["q"].mean, x.mean(dim=(0, 2, 3)).float())
    assert torch.allclose(stats["q"].std, x.transpose(0, 1).reshape(4, -1).std(dim=1).float())
    assert stats["k"].mean.shape == (2,) and stats["v"].std.shape == (2,)
    assert torch.allclose(stats["out"].mean, out.mean(dim=(0, 2, 3)).float())
    assert not stats["out"].mean.requires_grad


@pytest.mark.parametrize("extra", [{}, {"head_offsets": True}], ids=["paper", "head-offsets"])
def test_gradients_reach_all_scalers(extra):
    module = make_module(physics(**extra)).float()
    q, k, v = (x.float() for x in inputs())
    run(module, q, k, v).pow(2).sum().backward()
    for name, p in module.cim.scalers.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_errors_name_the_problem():
    module = make_module(physics(context_policy="error"))
    q, k, v = inputs(t=9, s=9)
    with pytest.raises(CimattnError, match="exceeds the gain-cell window of 8"):
        run(module, q, k, v)
    run(module, q[:, :, :8], k[:, :, :8], v[:, :, :8])  # 8 tokens fit
    q, k, v = inputs(t=4, s=4)
    k[0, 0, 1, 1] = float("nan")
    with pytest.raises(CimattnError, match="non-finite key"):
        run(make_module(physics()), q, k, v)
    with pytest.raises(CimattnError, match="convert the model"):
        gaincell_attention(nn.Module(), q, k, v, None)
    with pytest.raises(CimattnError, match="do not match"):
        run(make_module(physics(), heads=4, kv_heads=4), *inputs(t=4, s=4))


def test_scaler_gain_is_kept_positive():
    module = make_module(physics(scaler_q=Scaler(a=1.0, b=0.0)), random_scalers=False)
    with torch.no_grad():
        module.cim.scalers["q"].a.fill_(-2.0)
    q, k, v = inputs()
    assert torch.allclose(module.cim.scalers["q"](q), torch.full_like(q, 0.0) + 1e-6 * q)
    assert torch.isfinite(run(module, q, k, v)).all()


# ---- decode on the stored array state (gaincell_decode) ----

@pytest.fixture
def every_step(monkeypatch):
    """The stored state from the first decode step (by default only from MIN_CACHED_TOKENS cached tokens)."""
    monkeypatch.setattr(gca_decode, "MIN_CACHED_TOKENS", 1)


def decode(module, q, k, v, s, mask=None, position_ids=None):
    """One decode call: the query of cache index s − 1 over the first s cached tokens, under no_grad (B, H, 1, D)."""
    with torch.no_grad():
        return run(module, q[:, :, s - 1 : s], k[:, :, :s], v[:, :, :s], None if mask is None else mask[..., s - 1 : s, :s],
                   position_ids=None if position_ids is None else position_ids[:, s - 1 : s])


def expected(module, q, k, v, s, key_valid=None, offsets=None):
    return reference(module, q[:, :, s - 1 : s], k[:, :, :s], v[:, :, :s], key_valid, offsets)


@pytest.mark.usefixtures("every_step")
@pytest.mark.parametrize("kind", ["nonlinear", "linear"])
@pytest.mark.parametrize("extra", [{}, {"noise": Noise(cell_variability_std=0.1, seed=3), "normalize": True, "av_tile_scale": 0.02},
                                   {"offset_per_doubling": 0.3, "offset_reference_keys": 2},
                                   {"head_offsets": True, "normalize": True}],
                         ids=["ideal-chip", "variability-normalize", "offset-per-doubling", "head-offsets"])
def test_decode_steps_write_one_slot_each_and_equal_the_loop_reference(kind, extra, monkeypatch):
    """Token by token through an 8-token ring (20 steps, 2.5 laps): each step equals the equations and writes one slot."""
    module = make_module(physics(cell=kind, **extra))
    q, k, v = inputs(t=22, s=22, seed=4)
    writes = []
    real_write = gca_decode._write
    monkeypatch.setattr(gca_decode, "_write", lambda cim, state, stale, *a: (writes.append(int(stale.sum())), real_write(cim, state, stale, *a)))
    for s in range(3, 23):
        assert torch.allclose(decode(module, q, k, v, s), expected(module, q, k, v, s), atol=1e-10), s
    assert writes == [2 * 3] + [2] * 19  # 3 tokens × 2 sequences first, then each step only the new token's slot per sequence
    state = module.cim.decode_state
    assert state.k_terms.shape[-1] == 8 and state.v_terms.shape[2] == 8 and state.raw_k.shape[2] == 16 and state.index[0].tolist() == [16, 17, 18, 19, 20, 21, 14, 15]  # O(window)


@pytest.mark.usefixtures("every_step")
def test_decode_rewrites_slots_whose_cached_token_changed():
    """A rewound (cropped) cache and an edited old row are seen: the state is checked against the cache every step."""
    module = make_module(physics(noise=Noise(cell_variability_std=0.1)))
    q, k, v = inputs(t=16, s=16, seed=5)
    for s in range(4, 15):
        decode(module, q, k, v, s)
    assert torch.allclose(decode(module, q, k, v, 9), expected(module, q, k, v, 9), atol=1e-10)  # rewound 5 tokens
    k1 = k.clone()
    k1[0, 1, 8, 0] += 0.25  # the newest token of sequence 0 replaced at the same index (a regenerated token)
    assert torch.allclose(decode(module, q, k1, v, 9), expected(module, q, k1, v, 9), atol=1e-10)
    k2, v2 = k.clone(), v.clone()
    k2[1, 0, 6, 2] += 0.3  # an old token of sequence 1, still in the window
    v2[0, 1, 3, 0] -= 0.2
    for s in (10, 11):
        assert torch.allclose(decode(module, q, k2, v2, s), expected(module, q, k2, v2, s), atol=1e-10)
    k2[0, 1, 7, 1] = float("nan")
    with pytest.raises(CimattnError, match="non-finite key"):
        decode(module, q, k2, v2, 12)


@pytest.mark.usefixtures("every_step")
@pytest.mark.parametrize("extra", [{}, {"offset_per_doubling": 0.3, "offset_reference_keys": 2}], ids=["paper", "offset-per-doubling"])
def test_decode_with_left_padding_and_position_ids(extra):
    """Sequences padded by different amounts (ring offsets 3 and 0): each step equals the reference with its keys masked."""
    module = make_module(physics(**extra))
    q, k, v = inputs(t=18, s=18, seed=6)
    pad = 3
    valid = torch.ones(2, 18, dtype=torch.bool)
    valid[0, :pad] = False
    mask = torch.ones(18, 18, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)
    for s in range(pad + 2, 19):
        got = decode(module, q, k, v, s, mask, position_ids)
        assert torch.allclose(got, expected(module, q, k, v, s, valid[:, :s], offsets=torch.tensor([pad, 0])), atol=1e-10), s


@pytest.mark.usefixtures("every_step")
def test_decode_state_follows_the_scalers_and_reanchors_fast_leakage():
    """Changed k/v scalers rebuild the state; with τ of a quarter token step the leakage anchor moves every 5 tokens."""
    cfg = physics(leakage=Leakage(tau_s=2e-7, step_time_s=8e-7))
    assert max_query_block(cfg) == 5
    module = make_module(cfg)
    q, k, v = inputs(t=20, s=20, seed=7)
    anchors = set()
    for s in range(2, 21):
        got = decode(module, q, k, v, s)
        assert torch.isfinite(got).all() and torch.allclose(got, expected(module, q, k, v, s), atol=1e-10), s
        anchors.add(module.cim.decode_state.anchor)
    assert len(anchors) >= 3
    with torch.no_grad():
        module.cim.scalers["v"].b.add_(0.05)
    assert torch.allclose(decode(module, q, k, v, 20), expected(module, q, k, v, 20), atol=1e-10)


@pytest.mark.usefixtures("every_step")
def test_decode_read_noise_is_seeded():
    module = make_module(physics(noise=Noise(read_std=0.02, seed=7)))
    q, k, v = inputs(t=12, s=12)
    first = [decode(module, q, k, v, s) for s in range(4, 13)]
    module.cim.reset_noise()
    module.cim.decode_state = None
    again = [decode(module, q, k, v, s) for s in range(4, 13)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    clean = make_module(physics())
    deviation = torch.stack([(a - decode(clean, q, k, v, s)).abs().mean() for a, s in zip(first, range(4, 13))])
    assert (deviation > 0).all() and (deviation < 0.5).all()


@pytest.mark.usefixtures("every_step")
def test_training_and_statistics_take_the_torch_path():
    """With gradients on (or statistics asked) a one-token call is the torch path: the stored state is freed, gradients flow."""
    module = make_module(physics())
    q, k, v = inputs(t=6, s=6)
    decode(module, q, k, v, 5)
    assert module.cim.decode_state is not None
    q.requires_grad_()
    run(module, q[:, :, 5:], k, v).sum().backward()
    assert module.cim.decode_state is None and q.grad.abs().sum() > 0
    module.cim.record_stats = True
    decode(module, q.detach(), k, v, 6)
    assert module.cim.decode_state is None and set(module.cim.stats) == {"q", "k", "v", "out"}


def test_short_caches_take_the_torch_path():
    """Below MIN_CACHED_TOKENS a decode call reads the S cached tokens directly (cheaper than the state's write)."""
    module = make_module(physics())
    n = gca_decode.MIN_CACHED_TOKENS
    q, k, v = inputs(t=n + 2, s=n + 2, seed=8)
    short = decode(module, q, k, v, n - 1)
    assert module.cim.decode_state is None
    assert torch.allclose(short, expected(module, q, k, v, n - 1), atol=1e-10)
    for s in (n, n + 1, n + 2):
        assert torch.allclose(decode(module, q, k, v, s), expected(module, q, k, v, s), atol=1e-10)
        assert module.cim.decode_state is not None
