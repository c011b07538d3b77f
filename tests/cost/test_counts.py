"""Operation counts on hand-computed cases, the mapper, monotonicity in each parameter, and gradients."""

import math

import pytest
import torch

from cimattn.config import load_preset
from cimattn.cost import (
    SHAPES,
    GainCellDesign,
    ModelShape,
    decode,
    load_table,
    map_gaincell,
    prefill,
)
from cimattn.cost import hardware as hw
from cimattn.cost.gpu import load_gpus, roofline_decode
from cimattn.errors import CimattnError

HEAD = ModelShape("head", 1, 1, 1, 64)
LEROUX = load_table("leroux-gaincell")
P = LEROUX.tensors()


def test_gaincell_counts_at_the_paper_window():
    # Leroux: 1,024-token window of 64-token arrays, d = 64 → 16 tiles per head
    c, _, lat = hw.gaincell_query(P, GainCellDesign(), 64, 1024)
    assert float(c["qk_cell_reads"]) == 1024 * 64 == float(c["av_cell_reads"])
    assert float(c["charge_to_pulse"]) == 1024
    assert float(c["adc_conversions"]) == 16 * 64 == float(c["q_dac_conversions"])
    assert float(c["digital_ops"]) == 2 * 16 * 64 + 64
    assert float(lat["digital tile sum"]) == pytest.approx(4e-9)  # log2(16) adder stages of 1 ns


def test_gaincell_variants_normalisation_column_and_context_offset():
    # gaincell-normalized: a ΣA column beside the 64 V columns (read, converted, summed, divided by) and the
    # HardSigmoid reference set per query from the occupancy (a lookup and an add)
    design = GainCellDesign.from_preset(load_preset("gaincell-normalized").gaincell)
    assert design.normalize and design.context_offset
    c, _, lat = hw.gaincell_query(P, design, 64, 1024)
    assert float(c["qk_cell_reads"]) == 1024 * 64 and float(c["av_cell_reads"]) == 1024 * 65
    assert float(c["adc_conversions"]) == 16 * 65 and float(c["q_dac_conversions"]) == 16 * 64
    assert float(c["digital_ops"]) == (2 * 16 * 64 + 64) + (16 + 64) + 2
    assert float(lat["digital tile sum"]) == pytest.approx(5e-9)  # the division: one clock after log2(16) stages
    plain = decode(LEROUX, HEAD, 1024, hardware=load_preset("leroux-gaincell"))
    variant = decode(LEROUX, HEAD, 1024, hardware=load_preset("gaincell-normalized"))
    # one KV head: 16 V tiles, each with a 64-cell ΣA column
    assert float(variant.area) - float(plain.area) == pytest.approx(16 * 64 * float(P["cell.area_m2"]))
    assert float(variant.energy) > float(plain.energy) and float(variant.latency) > float(plain.latency)


def test_gaincell_partial_window_and_model_scaling():
    # 100 tokens in a 128-token window of 64-token arrays: 2 tiles hold tokens
    design = GainCellDesign(window_tokens=128)
    c, _, _ = hw.gaincell_query(P, design, 16, 100)
    assert float(c["qk_cell_reads"]) == 100 * 16 and float(c["adc_conversions"]) == 2 * 16
    shape = ModelShape("s", 2, 4, 2, 16)
    b = decode(LEROUX, shape, 300, hardware=None)  # default design: window 1,024 → 300 keys, 5 tiles
    assert float(b.counts["qk_cell_reads"]) == 2 * 4 * 300 * 16
    assert float(b.counts["write_dac_conversions"]) == 2 * 2 * 2 * 16  # layers × KV heads × (k + v) × d
    # GQA share: 2 query heads read each KV head's arrays one after another
    assert float(b.latency_s["query pulse (DAC)"]) == pytest.approx(2 * 2 * 15e-9)


def test_sprint_and_hyatt_counts():
    p = load_table("sprint").tensors()
    c, _, cycles = hw.sprint_query(p, 100, 16, 0.2, 0.05)
    assert float(c["fetched_bytes"]) == pytest.approx(0.05 * 100 * 2 * 16)  # 8-bit K and V of refetched keys
    assert float(c["digital_macs"]) == pytest.approx(2 * 20 * 16)
    assert float(cycles) == pytest.approx(8 + 640 / float(p["compute_unit.macs_per_cycle"]))
    # a buffer too small for the kept set refetches the overflow every query
    c2, _, _ = hw.sprint_query(p, 100, 16, 0.2, 0.05, hw.SprintDesign(buffer_bytes=320))
    assert float(c2["fetched_bytes"]) == pytest.approx(160 + (20 * 32 - 320))
    c, _, _ = hw.hyatt_query(load_table("hyatt").tensors(), 100, 16, 0.25)
    assert float(c["analog_ops"]) == 2 * 100 * 16 and float(c["digital_ops"]) == 4 * 0.25 * 100 * 16


def test_gpu_roofline_bytes():
    shape = ModelShape("s", 2, 4, 2, 8)
    r = roofline_decode(load_gpus().gpus["h100-sxm"], shape, 10, bytes_per_element=2)
    assert float(r["bytes"]) == 2 * (2 * 10 * 2 + 2 * 4) * 8 * 2
    assert float(r["flops"]) == 2 * 4 * 10 * 4 * 8 and bool(r["memory_bound"])


def test_mapper_spatial_and_time_multiplexed():
    smol = SHAPES["smollm2-135m"]
    m = map_gaincell(smol, window_tokens=1024, tokens_per_array=64, head_dim_per_array=64)
    assert m.arrays_needed == 30 * 3 * 2 * 16 and m.spatial and len(m.placement()) == m.arrays_needed
    small = map_gaincell(smol, window_tokens=1024, tokens_per_array=64, head_dim_per_array=64, arrays_available=200)
    assert small.layers_per_pass == 2 and small.passes == 15 and small.arrays_used == 192
    assert max(row[1] for row in small.placement()) < 200
    rep = map_gaincell(smol, window_tokens=1024, tokens_per_array=64, head_dim_per_array=64, gqa="replicate")
    assert rep.arrays_needed == 3 * m.arrays_needed and rep.sequential_reads == 1
    with pytest.raises(CimattnError, match="one layer needs 96"):
        map_gaincell(smol, window_tokens=1024, tokens_per_array=64, head_dim_per_array=64, arrays_available=50)
    # the schedule's reloads cost energy and time
    full = decode(LEROUX, smol, 1024)
    mux = decode(LEROUX, smol, 1024, arrays_available=200)
    assert float(mux.energy) > float(full.energy) and float(mux.latency) > float(full.latency)
    assert float(mux.area) < float(full.area)


def _preset(**gaincell):
    hwcfg = load_preset("leroux-gaincell")
    return hwcfg.model_copy(update={"gaincell": hwcfg.gaincell.model_copy(update=gaincell)})


def _cost(shape=HEAD, context=4096, **gaincell):
    b = decode(LEROUX, shape, context, hardware=_preset(**gaincell))
    return float(b.energy), float(b.latency), float(b.area)


def test_monotone_in_window_heads_head_dim_and_levels():
    base = _cost()
    assert all(a > b for a, b in zip(_cost(window_tokens=2048), base))  # more keys read, more cells
    wider = ModelShape("h", 1, 2, 2, 64)
    assert _cost(wider)[0] > base[0] and _cost(wider)[2] > base[2]
    deeper = ModelShape("h", 1, 1, 1, 128)
    assert _cost(deeper)[0] > base[0] and _cost(deeper)[2] > base[2]
    q = load_preset("leroux-gaincell").gaincell.q
    e, t, _ = _cost(q=q.model_copy(update={"levels": 32}))
    assert e > base[0] and t > base[1]  # longer query pulse, costlier DAC
    av = load_preset("leroux-gaincell").gaincell.av_out
    e, t, _ = _cost(av_out=av.model_copy(update={"levels": 64}))
    assert e > base[0] and t > base[1]  # single-slope ADC: energy and time grow with levels
    # context: grows until the window is full, then flat (ring buffer)
    assert _cost(context=256)[0] < _cost(context=1024)[0] == _cost(context=8192)[0]


@pytest.mark.parametrize("table", ["sprint", "hyatt"])
def test_monotone_in_keep_rate_and_context(table):
    t = load_table(table)
    shape = SHAPES["gpt2"]
    lo = decode(t, shape, 2048, telemetry={"keep_rate": 0.1})
    hi = decode(t, shape, 2048, telemetry={"keep_rate": 0.4})
    assert float(hi.energy) > float(lo.energy) and float(hi.latency) >= float(lo.latency)
    assert float(decode(t, shape, 4096).energy) > float(decode(t, shape, 2048).energy)
    if table == "sprint":
        more = decode(t, shape, 2048, telemetry={"refetch_fraction": 0.1})
        assert float(more.energy) > float(decode(t, shape, 2048).energy)


def test_telemetry_is_checked():
    with pytest.raises(CimattnError, match="keep_rate"):
        decode(load_table("sprint"), HEAD, 100, telemetry={"keep_rate": 1.5})


def test_prefill_sums_positions():
    shape = ModelShape("s", 2, 2, 2, 16)
    pre = prefill(LEROUX, shape, 5)
    steps = sum(float(decode(LEROUX, shape, n).energy) for n in range(1, 6))
    assert float(pre.energy) == pytest.approx(steps, rel=1e-12)
    assert float(pre.latency) == pytest.approx(float(decode(LEROUX, shape, 5).latency) / 2 * (5 + 2 - 1))


def test_gradients_in_hardware_parameters():
    params = {k: v.clone().requires_grad_(True) for k, v in LEROUX.tensors().items()}
    b = decode(LEROUX, HEAD, 1024, params=params)
    b.energy.backward()
    # ∂E/∂(cell read energy) = number of cell reads (Q·Kᵀ and A·V)
    assert float(params["cell.read_energy_j"].grad) == pytest.approx(2 * 1024 * 64)
    sp = load_table("sprint")
    keep = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    e = sum(hw.sprint_query(sp.tensors(), 1024, 64, keep, 0.02)[1].values())
    (g,) = torch.autograd.grad(e, keep)
    assert math.isfinite(float(g)) and float(g) > 0


def test_prune_recompute_presets_pick_their_chip_and_settings():
    from cimattn.cost.run import cost_metrics, table_for

    sprint, hyatt, digital = (load_preset(n) for n in ("sprint", "hyatt", "digital"))
    assert table_for(sprint).name == "sprint" and table_for(hyatt).name == "hyatt" and table_for(digital) is None
    shape = SHAPES["gpt2"]
    base = decode(load_table("sprint"), shape, 2048, hardware=sprint)
    assert "keep rate 0.25 (preset)" in base.notes
    pr = sprint.prune_recompute
    big = sprint.model_copy(update={"prune_recompute": pr.model_copy(update={"buffer": pr.buffer.model_copy(update={"size_kb": 64.0})})})
    faster = decode(load_table("sprint"), shape, 2048, hardware=big)
    assert float(faster.latency) < float(base.latency) and float(faster.area) > float(base.area)
    no_reuse = sprint.model_copy(update={"prune_recompute": pr.model_copy(update={"buffer": pr.buffer.model_copy(update={"reuse": False})})})
    assert float(decode(load_table("sprint"), shape, 2048, hardware=no_reuse).energy) > float(base.energy)
    told = decode(load_table("sprint"), shape, 2048, hardware=sprint, telemetry={"keep_rate": 0.1})
    assert "keep rate 0.1 (telemetry)" in told.notes
    m = cost_metrics(shape, digital, 1024)
    assert "energy_per_token_j" not in m and m["gpu"]["h100-sxm"]["latency_per_token_s"] > 0


def test_sprint_fetches_per_kv_head_and_reads_measured_bytes():
    t = load_table("sprint")
    p = t.tensors()
    mha, gqa = ModelShape("mha", 2, 4, 4, 16), ModelShape("gqa", 2, 4, 1, 16)
    fetch = lambda b: float(b.energy_j["K/V fetch (ReRAM read)"])
    tele = {"keep_rate": 0.2, "refetch_fraction": 0.05}
    a, b = decode(t, mha, 100, telemetry=tele), decode(t, gqa, 100, telemetry=tele)
    assert fetch(a) == pytest.approx(4 * fetch(b))  # K/V come once per KV head into the shared buffer
    assert float(a.energy_j["digital recompute"]) == pytest.approx(float(b.energy_j["digital recompute"]))  # per query head
    # the prune-and-recompute run's telemetry: bytes per token, summed over layers and KV heads
    told = decode(t, gqa, 100, telemetry=tele | {"fetched_bytes_per_query": 682.5})
    assert fetch(told) == pytest.approx(682.5 * 8 * float(p["reram.read_energy_per_bit_j"]))


@pytest.mark.parametrize("preset", ["sprint", "hyatt"])
def test_relative_rule_pays_a_second_scoring_read(preset):
    """Max tracking (the relative rule) reads the scoring array twice: its energy equals the scoring term, latency grows."""
    from cimattn.config import with_changes
    from cimattn.cost.hardware import MAX_TRACKING

    hw = load_preset(preset)
    relative = with_changes(hw, {"prune_recompute": {"selection": {"rule": "relative"}}})
    table, shape = load_table(preset), SHAPES["gpt2"]
    base, tracked = decode(table, shape, 2048, hardware=hw), decode(table, shape, 2048, hardware=relative)
    scoring = "in-ReRAM scoring" if preset == "sprint" else "analog CIM scoring"
    assert MAX_TRACKING not in base.energy_j
    assert float(tracked.energy_j[MAX_TRACKING]) == pytest.approx(float(tracked.energy_j[scoring]))
    assert float(tracked.energy) > float(base.energy) and float(tracked.latency) >= float(base.latency)
    assert any("read twice" in n for n in tracked.notes)


@pytest.mark.parametrize("preset", ["sprint", "hyatt"])
def test_probability_rule_pays_the_second_read_and_a_log_sum_exp_per_key(preset):
    """The probability rule reads the scores twice like the relative rule and accumulates a log-sum-exp over every
    scored key: its extra energy grows in proportion to the context."""
    from cimattn.config import with_changes
    from cimattn.cost.hardware import LOG_SUM_EXP, MAX_TRACKING

    hw = load_preset(preset)
    relative, probability = (with_changes(hw, {"prune_recompute": {"selection": {"rule": r}}}) for r in ("relative", "probability"))
    table, shape = load_table(preset), SHAPES["gpt2"]
    short, long = (decode(table, shape, n, hardware=probability) for n in (1024, 2048))
    tracked = decode(table, shape, 2048, hardware=relative)
    assert MAX_TRACKING in long.energy_j and LOG_SUM_EXP not in tracked.energy_j
    assert float(long.energy_j[LOG_SUM_EXP]) == pytest.approx(2 * float(short.energy_j[LOG_SUM_EXP]))
    assert float(long.energy) > float(tracked.energy) and float(long.latency) == pytest.approx(float(tracked.latency))
