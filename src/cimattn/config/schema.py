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


class Adapt(Strict):
    """How a converted model is adapted (Leroux et al.'s stages, each optional)."""

    calib_tokens: int = Field(8192, ge=64, description="tokens of calibration text for the statistics / initialization [tokens]")
    calib_context: int | None = Field(
        None, ge=8,
        description="sequence length of calibration and training windows; null = the run's --context. HardSigmoid "
        "attention has no normalisation, so its output grows with the keys it sums: adapt at the evaluated length [tokens]",
    )
    init_iterations: int = Field(100, ge=0, le=10000, description="max iterations of the initialization algorithm [1]")
    init_tolerance: float = Field(1e-4, gt=0, description="stop when every |error| of mean and std is below this [1]")
    layerwise_steps: int = Field(0, ge=0, description="layer-wise distillation steps per layer without --budget (0 = skip) [steps]")
    finetune_steps: int = Field(0, ge=0, description="distillation fine-tuning steps without --budget (0 = skip) [steps]")
    lr: float = Field(6e-4, gt=0, lt=1, description="AdamW learning rate of the distillation fine-tuning — " + LEROUX)
    layerwise_lr: float = Field(
        3e-3, gt=0, lt=1,
        description="AdamW learning rate of the layer-wise distillation (ours: on SmolLM2-135M layers 5 and 15 it reached 2–5× lower error than 6e-4 in 120 steps)",
    )
    weight_decay: float = Field(0.1, ge=0, lt=1, description="AdamW weight decay — " + LEROUX)
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas — " + LEROUX)
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip — " + LEROUX)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up [steps]")
    batch_size: int = Field(1, ge=1, description="sequences per step [1]")
    train: Literal["scalers", "attention", "all"] = Field("scalers", description="which parameters fine-tuning trains")


class HardwareConfig(Strict):
    """A named hardware design: which attention it runs and its device physics."""

    name: str = Field(description="preset name")
    description: str = Field("", description="one line on what this preset models")
    source: str = Field("", description="the publication the numbers come from")
    attention: Literal["digital", "gaincell"] = Field(description="attention family the hardware computes")
    gaincell: GainCell | None = Field(None, description="gain-cell array physics (attention: gaincell)")
    adapt: Adapt = Field(Adapt(), description="adaptation recipe")

    @model_validator(mode="after")
    def _family_section(self) -> HardwareConfig:
        if self.attention == "gaincell" and self.gaincell is None:
            self.gaincell = GainCell()
        if self.attention == "digital" and self.gaincell is not None:
            raise ValueError("a 'digital' preset takes no 'gaincell' section")
        return self
