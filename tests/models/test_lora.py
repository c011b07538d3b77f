"""LoRA adapters on the attention projections: a zero start, what trains, what is saved and loaded back."""

from contextlib import contextmanager

import pytest
import torch

from cimattn.adapt import adapt_model, load_adapted
from cimattn.config import load_preset
from cimattn.errors import CimattnError
from cimattn.models import convert, load_model
from cimattn.models.convert import hardware_state_dict, load_hardware_state, trainable_parameters

SMALL = {"window_tokens": 64, "tokens_per_array": 16}


def lora_preset(rank=4, **adapt):
    base = load_preset("gaincell-normalized")
    recipe = {"train": "lora", "lora_rank": rank, "calib_tokens": 128, "calib_context": 32, "skip": ["init"],
              "layerwise_steps": 3, "finetune_steps": 3, "layerwise_lr": 1e-2} | adapt
    return base.model_copy(update={"gaincell": base.gaincell.model_copy(update=SMALL), "adapt": base.adapt.model_copy(update=recipe)})


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_adapters_start_at_zero_and_cover_every_projection(name):
    hw = lora_preset(rank=4)
    plain, _ = load_model(name, seed=1)
    adapted, _ = load_model(name, seed=1)
    convert(plain, hw.model_copy(update={"adapt": hw.adapt.model_copy(update={"train": "scalers"})}))
    convert(adapted, hw)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, adapted(ids).logits)  # B = 0: the adapters change nothing yet
    trained = trainable_parameters(adapted, "lora")
    lora = {n: p for n, p in trained.items() if ".lora_" in n}
    projections = {"tiny-llama": 4, "tiny-gpt2": 2}[name]  # q/k/v/o; GPT-2's fused c_attn and c_proj
    assert len(lora) == 2 * projections * 2  # A and B, per projection, per layer (2 layers)
    assert len(trained) - len(lora) == len(trainable_parameters(adapted, "scalers"))
    assert all(p.shape[0] == 4 for n, p in lora.items() if n.endswith("lora_a"))
    convert(adapted, hw)  # converting again keeps one adapter per weight
    assert len({n for n in trainable_parameters(adapted, "lora") if ".lora_" in n}) == len(lora)


def test_adaptation_trains_the_adapters_and_ships_only_them(tmp_path):
    hw = lora_preset()
    teacher, _ = load_model("tiny-llama", seed=1)
    student, _ = load_model("tiny-llama", seed=1)
    convert(student, hw)
    data = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0))
    adapt_model(student, teacher, data, hw, budget_s=None, context=32, checkpoint_dir=tmp_path, seed=0,
                progress=_no_progress, evaluate=lambda label: 0.0)
    saved = hardware_state_dict(student, "lora")
    assert any(".lora_b" in n and v.abs().sum() > 0 for n, v in saved.items())  # B left zero
    assert not any(n.endswith("weight") or ".original" in n for n in saved)  # the frozen projections are not shipped

    fresh, _ = load_model("tiny-llama", seed=1)
    convert(fresh, hw)
    load_adapted(fresh, tmp_path)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, student(ids).logits)


def test_adapters_need_a_model_converted_with_them():
    hw = lora_preset()
    with_lora, _ = load_model("tiny-llama", seed=1)
    convert(with_lora, hw)
    without, _ = load_model("tiny-llama", seed=1)
    convert(without, hw.model_copy(update={"adapt": hw.adapt.model_copy(update={"train": "scalers"})}))
    with pytest.raises(CimattnError, match="unexpected"):
        load_hardware_state(without, hardware_state_dict(with_lora, "lora"))


@contextmanager
def _no_progress(description, total=None):
    yield lambda n=1: None
