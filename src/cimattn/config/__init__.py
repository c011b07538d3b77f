"""Hardware configurations and the YAML presets shipped with cimattn."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from cimattn.config.schema import (
    Adapt,
    Buffer,
    GainCell,
    HardwareConfig,
    Leakage,
    Noise,
    PruneRecompute,
    Quantizer,
    Scaler,
    Scorer,
    Selection,
)
from cimattn.errors import CimattnError

__all__ = [
    "Adapt", "Buffer", "GainCell", "HardwareConfig", "Leakage", "Noise", "PruneRecompute", "Quantizer", "Scaler",
    "Scorer", "Selection",
    "list_presets", "load_preset", "preset_yaml", "with_changes",
]

_PRESETS = resources.files("cimattn.config") / "presets"


def list_presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _PRESETS.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path) -> HardwareConfig:
    """A shipped preset by name, or a YAML file by path, validated."""
    text, origin = _read(str(name_or_path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CimattnError(f"preset {origin}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise CimattnError(f"preset {origin}: expected a mapping of fields, got {type(data).__name__}")
    data.setdefault("name", Path(origin).stem)
    try:
        return HardwareConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise CimattnError(f"preset {origin}: field '{loc}': {err['msg']}{more}") from None


def with_changes(config: HardwareConfig, changes: dict) -> HardwareConfig:
    """`config` with `changes` applied — nested dicts merge into their sections — validated again.

    A value the schema refuses raises pydantic's ValidationError (a ValueError): callers name the context.
    """

    def merge(base: dict, new: dict) -> dict:
        return base | {k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v for k, v in new.items()}

    return HardwareConfig.model_validate(merge(config.model_dump(), changes))


def preset_yaml(config: HardwareConfig) -> str:
    """Plain YAML of a config that `load_preset` accepts back unchanged."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read(name_or_path: str) -> tuple[str, str]:
    shipped = _PRESETS / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped.read_text(), name_or_path
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise CimattnError(f"preset file not found: {path}")
        return path.read_text(), str(path)
    raise CimattnError(f"unknown preset '{name_or_path}': choose one of {', '.join(list_presets())} or give a YAML path")
