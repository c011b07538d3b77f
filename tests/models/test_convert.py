"""convert() on the tiny test models: forward, decode ≡ prefill, hardware parameters, statistics."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cimattn.attention import gaincell_decode
from cimattn.attention.gaincell import GainCellParams
from cimattn.config import HardwareConfig, load_preset, with_changes
from cimattn.errors import CimattnError
from cimattn.models import (
    attention_modules,
    convert,
    hardware_layers,
    hardware_parameters,
    hardware_state_dict,
    hardware_stats,
    load_hardware_state,
    load_model,
    recorded_stats,
    reset_noise,
    scaler_parameters,
    set_cell,
    trainable_parameters,
)

TINY = ("tiny-llama", "tiny-gpt2", "tiny-qwen2")


def gaincell_preset(name="leroux-gaincell", **gaincell) -> HardwareConfig:
    """A shipped preset with some gaincell fields replaced (nested sections as dicts)."""
    return with_changes(load_preset(name), {"gaincell": gaincell})


def strong(**more) -> HardwareConfig:
    """Gains large enough that the tiny random models' attention outputs are far from 0 after quantisation,
    and leakage 0.05 per token, so a wrong token age shows in the logits."""
    base = dict(
        score_scale=0.5, av_tile_scale=0.25, scaler_q={"a": 3.0}, scaler_k={"a": 2.0}, scaler_v={"a": 2.0},
        leakage={"tau_s": 1.6e-5},
    )
    return gaincell_preset(**{**base, **more})


def ids(n, batch=1, seed=0):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_convert_and_forward(name):
    model, _ = load_model(name)
    x = ids(24, batch=2)
    with torch.no_grad():
        digital = model(x).logits
        convert(model, load_preset("leroux-gaincell"))
        hardware = model(x).logits
    assert model.config._attn_implementation == "cimattn_gaincell"
    layers = hardware_layers(model)
    assert len(layers) == model.config.num_hidden_layers and [c.layer_idx for c in layers] == [0, 1]
    heads = model.config.num_attention_heads
    kv = getattr(model.config, "num_key_value_heads", None) or heads
    assert (layers[0].n_heads, layers[0].n_kv_heads, layers[0].head_dim) == (heads, kv, 16)
    assert layers[0].scalers["k"].b.tolist() == pytest.approx([0.45] * kv)
    assert layers[0].scalers["out"].a.tolist() == [1.0] * heads
    assert torch.isfinite(hardware).all() and not torch.allclose(hardware, digital, atol=1e-3)


def test_digital_preset_keeps_the_models_math():
    model, _ = load_model("tiny-llama")
    x = ids(16)
    with torch.no_grad():
        before = model(x).logits
        convert(model, load_preset("leroux-gaincell"))
        convert(model, load_preset("digital"))
        after = model(x).logits
    assert model.config._attn_implementation == "cimattn_digital"
    assert not any(hasattr(m, "cim") for _, m in attention_modules(model))
    assert torch.allclose(before, after, atol=1e-5)


def prefill_then_decode(model, x, n):
    """Logits of the first n tokens in one forward, then one token at a time through the DynamicCache."""
    out = model(x[:, :n], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for i in range(n, x.shape[1]):
        out = model(x[:, i : i + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(
    "hw, n_tokens, n_prefill",
    [
        (strong(), 24, 10),
        # beyond the window: 80 tokens through a 32-token ring of 4 tiles, chip variability on
        (strong(window_tokens=32, tokens_per_array=8, noise={"cell_variability_std": 0.1}), 80, 20),
    ],
    ids=["within-window", "beyond-window"],
)
@pytest.mark.parametrize("min_cached", [1, 10**9], ids=["array-state", "torch-path"])
def test_decode_equals_prefill(hw, n_tokens, n_prefill, min_cached, monkeypatch):
    """Generating token by token with the cache gives the logits of one full forward (leakage included)."""
    monkeypatch.setattr(gaincell_decode, "MIN_CACHED_TOKENS", min_cached)
    model, _ = load_model("tiny-llama")
    model.double()  # rounding edges: float64 keeps prefill and decode on the same side
    convert(model, hw)
    x = ids(n_tokens, seed=1)
    with torch.no_grad():
        with recorded_stats(model) as stats:
            full = model(x).logits
        stepped = prefill_then_decode(model, x, n_prefill)
    assert all(stats[(layer, "out")].std.min() > 0.01 for layer in (0, 1))  # attention outputs are not all quantised to 0
    assert (full - stepped).abs().max() < 1e-4


def test_decode_with_wrong_ages_would_differ():
    """Guard for the test above: the same model with leakage off gives other logits, so ages matter there."""
    model, _ = load_model("tiny-llama")
    model.double()
    x = ids(24, seed=1)
    with torch.no_grad():
        convert(model, strong())
        leaky = model(x).logits
        convert(model, strong(leakage={"tau_s": None}))
        ideal = model(x).logits
    assert (leaky - ideal).abs().max() > 1e-2


def test_left_padded_batch_matches_single_sequences():
    """Batch + left padding (positions counted from each first real token, as generate does)."""
    model, _ = load_model("tiny-llama")
    model.double()
    convert(model, strong(window_tokens=16, tokens_per_array=4))
    a, b = ids(20, seed=2), ids(13, seed=3)
    pad = 20 - 13
    batch = torch.cat([a, torch.cat([torch.full((1, pad), 256), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        together = model(batch, attention_mask=mask, position_ids=position_ids).logits
        alone_a, alone_b = model(a).logits, model(b).logits
    assert (together[0] - alone_a[0]).abs().max() < 1e-6
    assert (together[1, pad:] - alone_b[0]).abs().max() < 1e-6


def test_hardware_parameters_train_and_round_trip_through_safetensors(tmp_path):
    model, _ = load_model("tiny-gpt2")
    convert(model, strong())
    params = list(hardware_parameters(model))
    assert len(params) == 2 * 4 * 2 and all(p.requires_grad for p in params)
    x = ids(16)
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    state = hardware_state_dict(model)
    assert set(state) == {f"transformer.h.{i}.attn.cim.scalers.{s}.{p}" for i in (0, 1) for s in ("q", "k", "v", "out") for p in "ab"}
    save_file(state, tmp_path / "hw.safetensors")

    fresh, _ = load_model("tiny-gpt2")
    convert(fresh, strong())
    load_hardware_state(fresh, load_file(tmp_path / "hw.safetensors"))
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)
    with pytest.raises(CimattnError, match="does not fit"):
        load_hardware_state(fresh, {k: v for k, v in state.items() if ".h.0." not in k})
    with pytest.raises(CimattnError, match="shape"):
        load_hardware_state(fresh, {k: v[:1] for k, v in state.items()})


def test_set_cell_switches_every_layer_in_place():
    model, _ = load_model("tiny-llama")
    hw = strong()
    convert(model, hw)
    x = ids(16)
    with torch.no_grad():
        nonlinear = model(x).logits
        set_cell(model, "linear")
        linear = model(x).logits
    assert all(c.cell == "linear" for c in hardware_layers(model)) and hw.gaincell.cell == "nonlinear"
    assert not torch.allclose(nonlinear, linear, atol=1e-3)
    with pytest.raises(CimattnError, match="unknown cell model"):
        set_cell(model, "cubic")


def test_recorded_stats_gives_per_layer_per_scaler_moments():
    model, _ = load_model("tiny-qwen2")
    convert(model, strong())
    with torch.no_grad():
        model(ids(12))
        assert all(c.stats == {} for c in hardware_layers(model))  # off unless asked
        with recorded_stats(model) as stats:
            model(ids(12, batch=2))
            assert stats == {}  # filled when the block ends
    assert set(stats) == {(layer, s) for layer in (0, 1) for s in ("q", "k", "v", "out")}
    for (layer, scaler), (mean, std) in stats.items():
        heads = 2 if scaler in ("k", "v") else 4
        assert mean.shape == std.shape == (heads,) and (std > 0).all()
    assert not any(c.record_stats for c in hardware_layers(model))
    assert torch.equal(hardware_stats(model)[1]["v"].mean, stats[(1, "v")].mean)
    a, b = scaler_parameters(dict(attention_modules(model))[1], "v")
    assert a is hardware_layers(model)[1].scalers["v"].a and b.shape == (2,)


def test_trainable_parameter_sets():
    model, _ = load_model("tiny-llama")
    convert(model, strong())
    scalers = trainable_parameters(model, "scalers")
    assert len(scalers) == 16 and all(".cim.scalers." in n for n in scalers)
    assert set(map(id, scalers.values())) == set(map(id, hardware_parameters(model)))
    attention = trainable_parameters(model, "attention")
    assert set(scalers) < set(attention) and "model.layers.0.self_attn.q_proj.weight" in attention
    assert "model.layers.0.mlp.up_proj.weight" not in attention
    assert len(trainable_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(CimattnError, match="unknown parameter set"):
        trainable_parameters(model, "some")


def test_realistic_preset_is_noisy_but_reproducible():
    model, _ = load_model("tiny-llama")
    convert(model, load_preset("gaincell-realistic"))
    cim = hardware_layers(model)[0]
    assert cim.k_gain.shape == (2, 1024, 16) and cim.k_gain.std().item() == pytest.approx(0.05, rel=0.1)
    x = ids(16)
    with torch.no_grad():
        first, second = model(x).logits, model(x).logits
        reset_noise(model)
        again = model(x).logits
    assert torch.equal(first, again) and not torch.equal(first, second)
    other, _ = load_model("tiny-llama")
    convert(other, load_preset("gaincell-realistic"))
    assert torch.equal(hardware_layers(other)[0].k_gain, cim.k_gain)  # the chip is drawn from noise.seed


def test_head_dim_larger_than_an_array_is_fine():
    """16 head dims on 8-row arrays: two arrays summed digitally, the same arithmetic."""
    model, _ = load_model("tiny-llama")
    x = ids(12)
    with torch.no_grad():
        convert(model, strong())
        one = model(x).logits
        convert(model, strong(head_dim_per_array=8))
        two = model(x).logits
    assert torch.equal(one, two)


def test_convert_does_not_touch_the_callers_config_and_can_repeat():
    model, _ = load_model("tiny-llama")
    hw = strong()
    convert(model, hw)
    convert(model, hw)
    assert len(list(hardware_parameters(model))) == 2 * 8
    assert isinstance(model.model.layers[0].self_attn.cim, GainCellParams)
    assert hardware_layers(model)[0].config is not hw.gaincell


def test_unsupported_models_are_refused():
    with pytest.raises(CimattnError):
        convert(nn.Linear(3, 3), load_preset("leroux-gaincell"))
    model, _ = load_model("tiny-llama")
    with pytest.raises(CimattnError, match="gain-cell preset"):
        set_cell(model, "linear")


def test_generate_with_left_padding_matches_single_prompts():
    """transformers' generate (DynamicCache, left padding, positions from the mask) equals one prompt at a time."""
    model, _ = load_model("tiny-llama")
    model.double()
    convert(model, strong(window_tokens=16, tokens_per_array=4))
    a, b = ids(9, seed=4), ids(6, seed=5)
    pad = 9 - 6  # not a multiple of the 4-token tile: a wrong ring position would regroup the tiles
    batch = torch.cat([a, torch.cat([torch.full((1, pad), 256), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=256, eos_token_id=None,  # 23 tokens: beyond the window
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kw)
        alone_a, alone_b = model.generate(a, **kw), model.generate(b, **kw)
    assert torch.equal(together.sequences[0], alone_a.sequences[0])
    assert torch.equal(together.sequences[1, pad:], alone_b.sequences[0])
    logits = torch.stack(together.logits, dim=1)  # (2, new tokens, vocab)
    assert (logits[0] - torch.stack(alone_a.logits, dim=1)[0]).abs().max() < 1e-6
    assert (logits[1] - torch.stack(alone_b.logits, dim=1)[0]).abs().max() < 1e-6
