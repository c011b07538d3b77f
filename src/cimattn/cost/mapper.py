"""Place a model's layers, KV heads and tiles onto a chip's gain-cell arrays.

The compiler step of a virtual-hardware flow (Klaiber et al., arXiv 1910.11632):
each (layer, KV head) needs K and V arrays for its window, `ceil(W / tokens_per_array)`
tiles × `ceil(head_dim / head_dim_per_array)` slices each.  With enough arrays the
mapping is fully spatial (every layer's KV state stays in place).  With fewer, layers
are time-multiplexed in passes: the arrays hold one group of layers at a time, so
each generated token reloads every layer's stored K/V from a state memory — the
cost the schedule adds to energy and latency.  Query heads of a GQA group either
share their KV head's arrays (read one after another) or get replicas (read at
once, written `group` times).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cimattn.cost.workload import ModelShape
from cimattn.errors import CimattnError


@dataclass(frozen=True)
class Mapping:
    shape: ModelShape
    window_tokens: int
    tokens_per_array: int
    head_dim_per_array: int
    gqa: Literal["share", "replicate"]
    arrays_available: int | None  # None: as many as the model needs

    @property
    def tiles(self) -> int:
        return math.ceil(self.window_tokens / self.tokens_per_array)

    @property
    def slices(self) -> int:
        return math.ceil(self.shape.head_dim / self.head_dim_per_array)

    @property
    def copies(self) -> int:
        """Array copies of each KV head: one, or one per query head of its group."""
        return self.shape.group if self.gqa == "replicate" else 1

    @property
    def arrays_per_layer(self) -> int:
        return 2 * self.tiles * self.slices * self.shape.kv_heads * self.copies  # 2: K and V

    @property
    def arrays_needed(self) -> int:
        return self.arrays_per_layer * self.shape.layers

    @property
    def layers_per_pass(self) -> int:
        if self.arrays_available is None or self.arrays_available >= self.arrays_needed:
            return self.shape.layers
        return self.arrays_available // self.arrays_per_layer

    @property
    def passes(self) -> int:
        return math.ceil(self.shape.layers / self.layers_per_pass)

    @property
    def arrays_used(self) -> int:
        return self.arrays_per_layer * self.layers_per_pass

    @property
    def sequential_reads(self) -> int:
        """Query heads read one after another on the same arrays (GQA share), per layer."""
        return self.shape.group if self.gqa == "share" else 1

    @property
    def spatial(self) -> bool:
        return self.passes == 1

    def placement(self) -> list[tuple[int, int, int, str, int, int, int]]:
        """(pass, array, layer, kv_head, copy, 'K'|'V', tile·slice) for every array the schedule uses."""
        rows, per = [], self.arrays_per_layer
        for layer in range(self.shape.layers):
            pass_, slot = divmod(layer, self.layers_per_pass)
            index = slot * per
            for head in range(self.shape.kv_heads):
                for copy in range(self.copies):
                    for kind in "KV":
                        for tile in range(self.tiles * self.slices):
                            rows.append((pass_, index, layer, head, copy, kind, tile))
                            index += 1
        return rows

    def summary(self) -> str:
        mode = "fully spatial" if self.spatial else f"time-multiplexed in {self.passes} passes of {self.layers_per_pass} layers"
        return (f"{self.arrays_needed} arrays needed ({self.shape.layers} layers × {self.shape.kv_heads} KV heads × "
                f"{self.copies} cop{'y' if self.copies == 1 else 'ies'} × K,V × {self.tiles} tiles × {self.slices} slices); "
                f"{self.arrays_used} used, {mode}")


def map_gaincell(
    shape: ModelShape, *, window_tokens: int, tokens_per_array: int, head_dim_per_array: int,
    arrays_available: int | None = None, gqa: Literal["share", "replicate"] = "share",
) -> Mapping:
    if gqa not in ("share", "replicate"):
        raise CimattnError(f"gqa mapping must be 'share' or 'replicate', got '{gqa}'")
    mapping = Mapping(shape, window_tokens, tokens_per_array, head_dim_per_array, gqa, arrays_available)
    if arrays_available is not None and arrays_available < mapping.arrays_per_layer:
        raise CimattnError(
            f"the chip has {arrays_available} arrays but one layer needs {mapping.arrays_per_layer}: "
            "give more arrays, a shorter window, or gqa 'share'"
        )
    return mapping
