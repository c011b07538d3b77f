"""Typed hardware configurations.

Every numeric field states its unit, its allowed range (enforced) and where
its default comes from, so a preset can be read like a datasheet.  Unknown
keys are rejected, so a typo in a YAML file fails at load with its name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LEROUX = "Leroux et al., Nat. Comput. Sci. 2025 (shared/PAPERS.md §1)"

# Eq. 4 of Leroux et al.: out = Σ C_ij · x · (y − 0.45)^i · V_in^j, in this (i, j) order.
LEROUX_CELL_POWERS: tuple[tuple[int, int], ...] = (
    (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0),
)
LEROUX_CELL_COEFFICIENTS: tuple[float, ...] = (
    0.17393044, 0.15653739, 0.14088365, 0.12679529, 5.51975209,
    4.96777688, 4.4709992, -1.44776001, -1.30298401, 46.05483778,
)


def field(default, unit: str, source: str, description: str, **constraints):
    """A config field carrying its unit and source next to its range."""
    return Field(
        default,
        description=f"{description} [{unit}]",
        json_schema_extra={"unit": unit, "source": source},
        **constraints,
    )


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Scaler(Strict):
    """Initial value of a trainable per-head affine map x' = a·x + b."""

    a: float = Field(1.0, gt=0, description="initial gain a (kept positive) [1]")
    b: float = Field(0.0, description="initial offset b [same unit as the clamp range]")


class Quantizer(Strict):
    """Clamp to [low, high], then round to `levels` evenly spaced values.

    `levels: null` means no rounding (the clamp stays): the ideal converter.
    """

    low: float = Field(description="lower clamp bound [V or 1]")
    high: float = Field(description="upper clamp bound [V or 1]")
    levels: int | None = Field(description="number of levels; null = not quantised [1]", ge=2, le=1 << 16)

    @model_validator(mode="after")
    def _ordered(self) -> Quantizer:
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must exceed low ({self.low})")
        return self

    @property
    def step(self) -> float | None:
        return None if self.levels is None else (self.high - self.low) / (self.levels - 1)


class Leakage(Strict):
    """Capacitor leakage of the stored voltage deviation (y − 0.45) by token age.

    decay per generation step = exp(−step_time_s / tau_s).  Set `tau_s: null`
    for an ideal (non-leaking) cell.
    """

    tau_s: float | None = field(
        5e-3, "s", LEROUX + ", retention τ", "retention time constant of the gain cell; null = no leakage", gt=0
    )
    step_time_s: float = field(
        8e-7, "s", LEROUX + ": 1.6e-4 per token = step/τ with τ = 5 ms",
        "time between two generation steps (one token)", gt=0,
    )

    @property
    def rate_per_token(self) -> float:
        return 0.0 if self.tau_s is None else self.step_time_s / self.tau_s


class Noise(Strict):
    """Read noise (per read) and device-to-device variability (per cell), seeded."""

    read_std: float = field(0.0, "fraction of full-scale", "off in Leroux et al.", "std of additive read noise on each array output", ge=0, le=1)
    cell_variability_std: float = field(
        0.0, "fraction", "off in Leroux et al.", "std of a multiplicative per-cell gain error, fixed at conversion", ge=0, le=1
    )
    seed: int = Field(0, ge=0, description="seed of the device-variability and read-noise generators [1]")


class GainCell(Strict):
    """The gain-cell attention array of Leroux et al. (charge-based, 64 × 64 tiles)."""

    window_tokens: int = field(1024, "tokens", LEROUX, "attention window W held in the arrays (ring buffer)", ge=1, le=1 << 20)
    tokens_per_array: int = field(64, "tokens", LEROUX + ": 64 × 64 arrays", "tokens (columns of K, rows of V) per array", ge=1, le=4096)
    head_dim_per_array: int = field(64, "cells", LEROUX + ": 64 × 64 arrays", "head dimensions per array", ge=1, le=4096)
    context_policy: Literal["error", "sliding"] = Field(
        "sliding",
        description="what happens to tokens beyond the window: 'sliding' overwrites the oldest (ring buffer); 'error' refuses longer contexts",
    )

    q: Quantizer = Field(Quantizer(low=0.0, high=1.0, levels=16), description="query pulse width (DAC), 16 levels in [0, 1], T_max = 15 ns — " + LEROUX)
    k: Quantizer = Field(Quantizer(low=0.0, high=0.9, levels=8), description="stored key voltage, 8 levels in [0, 0.9] V — " + LEROUX)
    v: Quantizer = Field(Quantizer(low=0.0, high=0.9, levels=8), description="stored value voltage, 8 levels in [0, 0.9] V — " + LEROUX)
    av_out: Quantizer = Field(Quantizer(low=-1.0, high=1.0, levels=32), description="A·V tile read-out (ADC), 32 levels in [−1, 1] — " + LEROUX)

    scaler_q: Scaler = Field(Scaler(a=1.0, b=0.0), description="initial query scaler — " + LEROUX)
    scaler_k: Scaler = Field(Scaler(a=1.0, b=0.45), description="initial key scaler — " + LEROUX)
    scaler_v: Scaler = Field(Scaler(a=1.0, b=0.45), description="initial value scaler — " + LEROUX)
    scaler_out: Scaler = Field(Scaler(a=1.0, b=0.0), description="initial output scaler — " + LEROUX)

    cell: Literal["nonlinear", "linear"] = Field("nonlinear", description="cell model: Eq. 4 polynomial or the linear cell")
    cell_gradient: Literal["linear", "exact"] = Field(
        "linear", description="backward of the nonlinear cell: the linear cell as surrogate (paper) or the polynomial's own derivative"
    )
    cell_coefficients: list[float] = field(
        list(LEROUX_CELL_COEFFICIENTS), "C per V^(i+j)", LEROUX + ", Eq. 4",
        "the ten Eq. 4 coefficients C_ij for (i, j) = (0,0),(0,1),(0,2),(0,3),(1,0),(1,1),(1,2),(2,0),(2,1),(3,0)",
        min_length=10, max_length=10,
    )
    v_in: float = field(0.9, "V", LEROUX, "read voltage V_in of Eq. 4", gt=0, le=5)
    y_mid: float = field(0.45, "V", LEROUX, "stored-voltage midpoint: the cell multiplies by (y − y_mid)", ge=0, le=5)
    linear_slope: float = field(19.3, "1/V", LEROUX + ": linear cell 19.3·x·(y − 0.45)", "slope of the linear cell", gt=0)

    score_scale: float = field(1 / 80, "1", LEROUX + ": A = clamp(S/80, 0, 1)", "HardSigmoid gain on the Q·Kᵀ score", gt=0)
    score_offset: float = field(0.0, "1", LEROUX, "HardSigmoid offset on the Q·Kᵀ score", ge=-10, le=10)
    offset_per_doubling: float = field(
        0.0, "1", "ours (off in the paper)",
        "hardware variant: the HardSigmoid offset falls by this for each doubling of the keys a query sees beyond "
        "offset_reference_keys (a per-row reference level the controller sets from the window occupancy), so the keys that "
        "pass the HardSigmoid do not grow in proportion to the context", ge=0, le=1,
    )
    offset_reference_keys: int = field(256, "tokens", "ours", "keys a query may see before offset_per_doubling lowers its offset",
                                       ge=1, le=1 << 20)
    head_offsets: bool = Field(
        False, description="hardware variant (ours, off in the paper): a trainable HardSigmoid offset per query head, added to "
        "score_offset and starting at 0 (a per-head reference level of the charge-to-pulse converter); it trains with the "
        "scalers. SmolLM2-135M, the demo's step counts (--replay, 16 / 99 / 27): layer-wise 135.5 → 129.3, adapted 98.4 → 96.7",
    )
    av_tile_scale: float = field(1 / 40, "1", LEROUX + ": × 1/40 per A·V tile", "gain of each A·V tile's charge-to-pulse read-out", gt=0)
    normalize: bool = Field(
        False, description="hardware variant: an all-ones V column gives ΣA and the output is divided by it digitally (off in the paper)"
    )

    leakage: Leakage = Field(Leakage(), description="capacitor leakage — " + LEROUX)
    noise: Noise = Field(Noise(), description="read noise and device variability — off in " + LEROUX)

    @model_validator(mode="after")
    def _window_tiles(self) -> GainCell:
        if self.window_tokens % self.tokens_per_array:
            raise ValueError(
                f"window_tokens ({self.window_tokens}) must be a multiple of tokens_per_array ({self.tokens_per_array})"
            )
        return self

    @property
    def decay_rate_per_token(self) -> float:
        return self.leakage.rate_per_token

    def cell_polynomial(self) -> list[float]:
        """f(u) coefficients c_i (i = 0..3) of out = x·Σ_i c_i·u^i at this V_in (Eq. 4 folded)."""
        c = [0.0] * 4
        for (i, j), coeff in zip(LEROUX_CELL_POWERS, self.cell_coefficients):
            c[i] += coeff * self.v_in**j
        return c


SPRINT = "Yazdanbakhsh et al., SPRINT, MICRO 2022 (shared/PAPERS.md §2)"
HYATT = "Moradifirouzabadi et al., HyAtt, ESSERC 2024 / JSSC 2025 (shared/PAPERS.md §3)"
QUEST = "Tang et al., Quest, ICML 2024 (16-token pages)"
ANALOG_SCORERS = ("reram", "charge")


class Scorer(Strict):
    """The cheap, approximate Q·Kᵀ that decides which keys are fetched.

    `reram` (SPRINT): key MSBs as multi-level conductances in a crossbar, the
    query through a DAC, one column current per key.  `charge` (HyAtt): key
    MSBs as binary bit cells, products shared as charge on a capacitor line,
    an optional ADC.  `exact`, `quest`, `h2o`, `random` are the digital
    baselines in the same harness (exact scores, Quest page bounds, H2O
    accumulated attention, uniform random).  Null bits / levels = ideal.
    """

    kind: Literal["reram", "charge", "exact", "quest", "h2o", "random"] = Field(
        "reram", description="how keys are scored: analog (reram | charge) or a digital baseline (exact | quest | h2o | random)"
    )
    key_bits: int | None = field(
        8, "bits", SPRINT + ": fixed-point keys, width not given (uncertain)",
        "bits of a stored key element (signed, symmetric); null = full-precision keys", ge=2, le=16,
    )
    key_msb_bits: int | None = field(
        4, "bits", SPRINT + ": 4 key MSBs in 4-bit multi-level cells",
        "most significant key bits the scorer sees; null = all key_bits", ge=1, le=16,
    )
    query_bits: int | None = field(
        4, "bits", SPRINT + ": a low-precision q is copied into the memory, width not given (uncertain)",
        "query DAC bits (signed, symmetric); null = ideal DAC", ge=2, le=16,
    )
    conductance_levels: int | None = field(
        16, "levels", SPRINT + ": 4-bit multi-level ReRAM cells",
        "distinct conductances of a ReRAM cell (reram only); null = continuous", ge=2, le=1 << 16,
    )
    output_bits: int | None = field(
        None, "bits", SPRINT + ": a 1-bit comparator per key column, no ADC",
        "ADC bits of the score read-out before selection; null = the comparator sees the analog value", ge=1, le=16,
    )
    variation_std: float = field(
        0.0, "fraction", "not given by SPRINT or HyAtt: ideal by default",
        "std of a multiplicative per-cell gain error (conductance / capacitor mismatch), fixed per stored key", ge=0, le=1,
    )
    read_noise_std: float = field(
        0.0, "fraction of full scale", "not given by SPRINT or HyAtt: ideal by default",
        "std of additive noise on each score read, relative to the column's full scale", ge=0, le=1,
    )
    comparator_offset_std: float = field(
        0.0, "fraction of full scale", SPRINT + ": a 1-bit analog comparator; its offset is not given",
        "std of each comparator's static input offset (threshold rules only)", ge=0, le=1,
    )
    page_tokens: int = field(16, "tokens", QUEST, "tokens per page of the Quest baseline (quest only)", ge=1, le=4096)
    seed: int = Field(0, ge=0, description="seed of variation, read noise, comparator offsets and the random baseline [1]")

    @model_validator(mode="after")
    def _bits(self) -> Scorer:
        if self.key_msb_bits is not None:
            if self.key_bits is None:
                raise ValueError(f"key_msb_bits ({self.key_msb_bits}) needs key_bits: set key_bits or key_msb_bits: null")
            if self.key_msb_bits > self.key_bits:
                raise ValueError(f"key_msb_bits ({self.key_msb_bits}) exceeds key_bits ({self.key_bits}): lower key_msb_bits")
        if self.kind == "charge" and self.conductance_levels is not None:
            raise ValueError("conductance_levels is a ReRAM property: set it to null for a charge scorer")
        return self


MARGIN_RULES = ("relative", "probability")  # rules whose threshold is a margin below a per-query reference score


class Selection(Strict):
    """Which scored keys are kept.

    threshold  keep a key when its score exceeds the layer/head threshold (a
               comparator against a fixed reference: SPRINT's rule);
    relative   keep a key when its score is within `threshold` of the
               query's highest score (needs a max-tracking circuit: a hardware
               variant with its own cost);
    probability keep a key when its score is within `threshold` of the
               log-sum-exp of the query's scores, i.e. its softmax weight
               under the scorer is at least exp(−threshold) (ours: a
               log-sum-exp accumulated over the analog scores, a hardware
               variant with its own cost; on exact scores it kept 10 % of
               SmolLM2's keys at 2,048 tokens for +0.48 % perplexity, the
               relative rule +1.59 %);
    top_k      keep the `top_k` highest scores per query;
    keep_rate  keep the ceil(keep_rate · visible keys) highest per query.
    Scores are in logits (q·k·scaling).  `threshold: null` means calibrated
    per layer and head to `keep_rate` on calibration text (the adapt stage);
    until then nothing is pruned.  Always-kept tokens count toward the rate.
    """

    rule: Literal["threshold", "relative", "probability", "top_k", "keep_rate"] = Field(
        "threshold", description="selection rule: threshold | relative | probability | top_k | keep_rate"
    )
    keep_rate: float = field(
        0.25, "fraction of visible keys", HYATT + ": ~75 % of tokens pruned",
        "target share of keys kept: the keep_rate rule's budget, the calibration target of threshold rules", gt=0, le=1,
    )
    top_k: int | None = field(None, "keys", "ours", "keys kept per query (top_k rule)", ge=1)
    threshold: float | None = field(
        None, "logits", SPRINT + ": a learned per-layer threshold (uncertain)",
        "fixed threshold (threshold rule) or margin below the row maximum (relative rule) or its log-sum-exp (probability "
        "rule) for every head; null = calibrated",
    )
    calibrate_per: Literal["head", "layer", "model"] = Field(
        "head", description="calibrated thresholds: one per head (every head keeps keep_rate), one per layer shared by its "
        "heads, or one for the whole model (ours: heads and layers with flat attention keep more keys, sharp ones fewer; "
        "the layer or the model keeps keep_rate)",
    )
    current: bool = Field(True, description="always keep the query's own token")
    recent_tokens: int = field(3, "tokens", "ours (issue 6's quick measurement)", "always keep this many tokens before the query", ge=0)
    sink_tokens: int = field(1, "tokens", "ours (issue 6's quick measurement)", "always keep the first tokens of the sequence (attention sinks)", ge=0)
    learn_steps: int = field(
        0, "steps", "LeOPArd-style learned thresholds (shared/PAPERS.md, neighbours)",
        "after calibration, train the thresholds through a soft comparator against the digital teacher (0 = calibration only)", ge=0,
    )
    learn_temperature: float = field(0.5, "logits", "ours", "width of the soft comparator sigmoid((score − threshold) / T) while learning", gt=0)
    learn_rate_weight: float = field(10.0, "1", "ours", "weight of (soft keep rate − keep_rate)² beside the distillation loss", ge=0)
    learn_lr: float = field(0.01, "logits per step", "ours, not tuned on a real model", "Adam learning rate of the thresholds", gt=0, lt=10)
    learn_context: int = field(
        512, "tokens", "ours: the backward holds every layer's soft (H, T, T) mask; SmolLM2-135M at 4 x 512 tokens peaked at 12.9 GB",
        "window length of threshold learning; an offset on every learned threshold then restores keep_rate at the run's context", ge=8,
    )

    @model_validator(mode="after")
    def _rule_fields(self) -> Selection:
        if self.rule == "top_k" and self.top_k is None:
            raise ValueError("rule 'top_k' needs top_k (keys kept per query)")
        if self.rule in MARGIN_RULES and self.threshold is not None and self.threshold < 0:
            raise ValueError(f"a {self.rule} threshold is a margin below the row's reference score: it must be ≥ 0, got {self.threshold}")
        return self


class Buffer(Strict):
    """SPRINT's on-chip K/V buffer: keys kept by the previous query and still buffered are not fetched again."""

    size_kb: float = field(16.0, "KiB", SPRINT + ": 16 / 32 / 64 KB configurations", "on-chip K/V buffer size", gt=0, le=1 << 20)
    bytes_per_element: float = field(
        1.0, "bytes", SPRINT + ": 8-bit fixed point assumed (uncertain)", "bytes of one stored K or V element", gt=0, le=8
    )
    reuse: bool = Field(True, description="adjacent-query reuse: keys still buffered from the previous query are not refetched — " + SPRINT)


class PruneRecompute(Strict):
    """Prune-and-recompute attention: analog scores → keep mask → exact softmax over the kept keys (SPRINT / HyAtt)."""

    scorer: Scorer = Field(Scorer(), description="the approximate scorer")
    selection: Selection = Field(Selection(), description="the keep rule and the always-kept tokens")
    buffer: Buffer = Field(Buffer(), description="on-chip buffer and fetch model")

    @model_validator(mode="after")
    def _combination(self) -> PruneRecompute:
        if self.scorer.kind == "h2o" and self.selection.rule not in ("keep_rate", "top_k"):
            raise ValueError("the h2o baseline splits a per-query budget: use selection.rule keep_rate or top_k")
        return self


class Adapt(Strict):
    """How a converted model is adapted (Leroux et al.'s stages, each optional)."""

    calib_tokens: int = Field(8192, ge=64, description="tokens of calibration text for the statistics / initialization [tokens]")
    calib_context: int | None = Field(
        None, ge=8,
        description="sequence length of calibration and training windows; null = the run's --context. HardSigmoid "
        "attention has no normalisation, so its output grows with the keys it sums: adapt at the evaluated length [tokens]",
    )
    finetune_context: int | None = Field(
        None, ge=8,
        description="sequence length of the end-to-end fine-tuning windows; null = calib_context. The statistics and "
        "layer-wise stages are cheap at a short length, but a model tuned end to end on short windows has never summed "
        "the keys of a long one (SmolLM2-135M, the demo's recipe, 1,024-token evaluation: 37 steps of 256 tokens → ppl 146.9; "
        "9 steps of 1,024 → 139.6; 18 → 116.6) [tokens]",
    )
    layerwise_context: int | None = Field(
        None, ge=8,
        description="sequence length of the layer-wise distillation windows; null = calib_context. Each layer then learns "
        "to reproduce the teacher over as many keys as a long evaluated window sums. SmolLM2-135M, the demo's recipe, one "
        "pair of runs: 35 steps per layer at 1,024 tokens (the time of 88 at 256) → ppl 163.0 after the stage, 124.0 after "
        "22 end-to-end steps, against 135.5 and 125.7; positions 512–1,023 better (131.7 vs 154.6), 64–511 worse [tokens]",
    )
    init_iterations: int = Field(100, ge=0, le=10000, description="max iterations of the initialization algorithm [1]")
    init_tolerance: float = Field(1e-4, gt=0, description="stop when every |error| of mean and std is below this [1]")
    layerwise_steps: int = Field(0, ge=0, description="layer-wise distillation steps per layer without --budget (0 = skip) [steps]")
    finetune_steps: int = Field(0, ge=0, description="distillation fine-tuning steps without --budget (0 = skip) [steps]")
    lr: float = Field(6e-4, gt=0, lt=1, description="AdamW learning rate of the distillation fine-tuning — " + LEROUX)
    layerwise_tokens: int | None = Field(
        None, ge=1, description="tokens each layer-wise step reads: whole rows of the layer-wise text (layerwise_text_tokens, "
        "else the calibration batch), drawn anew each step (seeded); null = all of it. Below that text's length, a long "
        "layer-wise stage sees more text than one step holds instead of fitting one small batch [tokens]",
    )
    layerwise_text_tokens: int | None = Field(
        None, ge=64, description="tokens of calibration text the layer-wise stage captures the teacher on and draws its "
        "steps from (rows of calib_context); null = the calibration batch. A layer's q/k/v/o projections memorise a small "
        "batch: SmolLM2-135M layer 9, 400 steps of 1,024 tokens each, held-out error 0.60 → 0.64 on one 1,024-token batch, "
        "0.60 → 0.30 drawing from 32,768 tokens [tokens]",
    )
    layerwise_lr: float = Field(
        3e-3, gt=0, lt=1,
        description="AdamW learning rate of the layer-wise distillation (ours: on SmolLM2-135M layers 5 and 15 it reached 2–5× lower error than 6e-4 in 120 steps)",
    )
    layerwise_scaler_lr: float | None = Field(
        None, gt=0, lt=1,
        description="AdamW learning rate of the hardware scalers (per-head gains and offsets, no weight decay) in layer-wise "
        "distillation; null = layerwise_lr. Ours, SmolLM2-135M, training-free fit + 6 steps per layer: 457 at 6e-4, 372 at "
        "6e-3, 331 at 1.8e-2, diverged (4,217) at 6e-2; after the initialization algorithm (240 s demo) only 286 → 277, and "
        "1e-2 in the noisy end-to-end steps as well made the result worse, so end-to-end keeps one rate",
    )
    linear_budget_share: float = Field(
        0.15, ge=0, le=1, description="with --budget: the share of the budget left when it starts that fine-tuning the "
        "linear model (the paper's step 1) may spend [1]",
    )
    layerwise_budget_share: float = Field(
        0.5, ge=0, le=1, description="with --budget: the share of the budget left when it starts that layer-wise "
        "distillation may spend; end-to-end fine-tuning takes the rest [1]",
    )
    lr_final_fraction: float = Field(
        1.0, gt=0, le=1, description="distillation fine-tuning's rate at its last step as a fraction of lr: after the first "
        "3 steps (a budget's step count is planned from their pace) the rate falls linearly to it; 1 = constant. A dozen "
        "noisy end-to-end steps at a constant rate leave the result wherever the last one lands [1]",
    )
    kl_tokens: int | None = Field(
        None, ge=1, description="positions of each distillation window whose logits enter the KL, a seeded draw per "
        "step; null = all. The LM head and the softmax over the vocabulary then run on those positions only, while "
        "every position still trains the attention through the later ones' keys [tokens]",
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="'bf16': the training steps (layer-wise and end-to-end distillation) run the digital layers of the "
        "student and the teacher (projections, MLPs, LM head) under bf16 autocast, as the paper's training does (" + LEROUX + "); "
        "the simulated arrays' values stay fp32 (only the products of their surrogate gradient run in bf16), and the teacher's "
        "captured activations and every evaluation are fp32. On this project's "
        "CPU (AVX512-BF16) a bf16 matmul ran at 4.7x the fp32 rate; a SmolLM2 end-to-end step took 7.3 s instead of 9.7 s, a "
        "layer-wise step 58 ms instead of 74 ms",
    )
    weight_decay: float = Field(0.1, ge=0, lt=1, description="AdamW weight decay — " + LEROUX)
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas — " + LEROUX)
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip — " + LEROUX)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up [steps]")
    batch_size: int = Field(1, ge=1, description="sequences per step [1]")
    train: Literal["scalers", "lora", "attention", "all"] = Field(
        "scalers", description="which parameters layer-wise and end-to-end distillation train: the hardware scalers; those "
        "and low-rank adapters on the attention projections (ours: a few MB to ship); those and the full projections; everything",
    )
    lora_rank: int = Field(16, ge=1, le=1024, description="rank of the LoRA adapters when train is 'lora' [1]")
    data: Literal["corpus", "teacher"] = Field(
        "corpus", description="text every adaptation stage reads: the bundled corpus' training works, or text sampled from "
        "the digital teacher (temperature 1, each sequence prompted by the corpus; no data needed beyond a few prompts)",
    )
    teacher_tokens: int = Field(8192, ge=64, description="tokens of teacher-sampled text when data is 'teacher' [tokens]")
    hidden_weight: float = Field(
        0.0, ge=0, description="weight of hidden-state matching in distillation fine-tuning: the KL on logits plus this × "
        "the mean over decoder layers and tokens of ‖student − teacher hidden state‖² / ‖teacher hidden state‖²; 0 = logits only [1]",
    )
    skip: list[Literal["linear_finetune", "init", "layerwise", "finetune"]] = Field(
        [], description="stages not run (their budget share goes to the later ones): the linear model's fine-tuning, "
        "the initialization algorithm, layer-wise distillation, end-to-end fine-tuning",
    )


class HardwareConfig(Strict):
    """A named hardware design: which attention it runs and its device physics."""

    name: str = Field(description="preset name")
    description: str = Field("", description="one line on what this preset models")
    source: str = Field("", description="the publication the numbers come from")
    attention: Literal["digital", "gaincell", "prune_recompute"] = Field(description="attention family the hardware computes")
    gaincell: GainCell | None = Field(None, description="gain-cell array physics (attention: gaincell)")
    prune_recompute: PruneRecompute | None = Field(None, description="scorer, selection and buffer (attention: prune_recompute)")
    adapt: Adapt = Field(Adapt(), description="adaptation recipe")

    @model_validator(mode="after")
    def _family_section(self) -> HardwareConfig:
        if self.attention == "gaincell" and self.gaincell is None:
            self.gaincell = GainCell()
        if self.attention == "digital" and self.gaincell is not None:
            raise ValueError("a 'digital' preset takes no 'gaincell' section")
        if self.attention == "prune_recompute" and self.prune_recompute is None:
            raise ValueError("attention 'prune_recompute' needs a 'prune_recompute' section (scorer, selection, buffer)")
        if self.attention != "prune_recompute" and self.prune_recompute is not None:
            raise ValueError(f"a '{self.attention}' preset takes no 'prune_recompute' section")
        return self
