"""Adapted parameters and resumable training state, in safetensors.

An adapted directory holds:
  preset.yaml             the hardware config the parameters belong to
  hardware.safetensors    the adapted model's hardware (and trained) parameters
  state.json              finished stages and their metrics / histories
  train-STAGE.safetensors while fine-tuning runs: parameters, optimizer
                          tensors and step in one file, so one atomic write
                          makes a consistent checkpoint; removed once the
                          stage's result is saved
  teacher-text.safetensors with `data: teacher`, the text sampled from the
                          teacher that every stage reads
Every file is written atomically: a kill leaves the previous version.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from cimattn.config import HardwareConfig, preset_yaml
from cimattn.errors import CimattnError
from cimattn.storage import atomic_write_bytes, atomic_write_json, atomic_write_text

PRESET = "preset.yaml"
PARAMS = "hardware.safetensors"
STATE = "state.json"


def save_parameters(directory: Path, tensors: dict[str, torch.Tensor], hardware: HardwareConfig) -> None:
    directory = Path(directory)
    atomic_write_text(directory / PRESET, preset_yaml(hardware))
    atomic_write_bytes(directory / PARAMS, save(_cpu(tensors)))


def load_parameters(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / PARAMS
    if not path.is_file():
        raise CimattnError(f"{directory}: no {PARAMS} in it; give the adapted/ folder of a finished run")
    return load(path.read_bytes())


def read_state(directory: Path) -> dict:
    path = Path(directory) / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def update_state(directory: Path, **entries) -> dict:
    state = read_state(directory) | entries
    atomic_write_json(Path(directory) / STATE, state)
    return state


def save_training(directory: Path, stage: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """One file with everything a fine-tuning stage needs to resume exactly."""
    sd = optimizer.state_dict()
    tensors = {f"param.{k}": v for k, v in params.items()}
    scalars = {}
    for index, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars), "progress": json.dumps(progress)}
    atomic_write_bytes(Path(directory) / f"train-{stage}.safetensors", save(_cpu(tensors), metadata=meta))


def drop_training(directory: Path, stage: str) -> None:
    """Remove a finished stage's training checkpoint: its result lives in the parameters file."""
    (Path(directory) / f"train-{stage}.safetensors").unlink(missing_ok=True)


def load_training(directory: Path, stage: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(parameters, progress) of a stage's last checkpoint, the optimizer restored; None when there is none."""
    path = Path(directory) / f"train-{stage}.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    state: dict[int, dict] = {}
    slots = [(k.removeprefix("optim."), v) for k, v in tensors.items() if k.startswith("optim.")]
    for key, value in [*slots, *json.loads(meta["scalars"]).items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return params, json.loads(meta["progress"])


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
