"""IndexCache patterns: which DSA layers keep their indexer (F, "full") and which reuse the top-k of the
nearest F layer before them (S, "shared").

Two uniform conventions exist in the field, and both come from the official schedule

    layer i is F  iff  max(i - offset + 1, 0) % freq == 0

- the paper's uniform pattern FSSS FSSS ... is offset = 1 (`PAPER_OFFSET`);
- the official patch (transformers, SGLang, vLLM) defaults to offset = 2 (`OFFICIAL_OFFSET`), which keeps
  layers 0 and 1 both F: FFSSS FSSS ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PAPER_OFFSET = 1
OFFICIAL_OFFSET = 2
_INDEXER_TYPES = {"F": "full", "S": "shared"}


@dataclass(frozen=True)
class IndexCachePattern:
    """One character per DSA layer: "F" keeps the layer's indexer, "S" reuses the previous F layer's top-k."""

    layers: str

    def __post_init__(self):
        if not isinstance(self.layers, str):
            raise ValueError(f"An IndexCache pattern is a string of F and S, got {type(self.layers).__name__}.")
        if not self.layers:
            raise ValueError("The IndexCache pattern is empty: it needs one F/S character per DSA layer.")
        bad = sorted({c for c in self.layers if c not in _INDEXER_TYPES})
        if bad:
            raise ValueError(
                f"The IndexCache pattern {self.layers!r} holds {bad}: only 'F' (full) and 'S' (shared) are allowed."
            )
        if self.layers[0] != "F":
            raise ValueError(
                f"The IndexCache pattern {self.layers!r} starts with S: layer 0 has no earlier layer to share from, "
                "so it must be F."
            )

    # ----------------------------------------------------------------------------------------- constructors
    @classmethod
    def parse(cls, pattern: str, num_layers: int | None = None) -> IndexCachePattern:
        """Build from a string such as "FSSSFSSS"; with `num_layers`, check the length too."""
        result = cls(pattern)
        if num_layers is not None:
            result.check_num_layers(num_layers)
        return result

    @classmethod
    def all_full(cls, num_layers: int) -> IndexCachePattern:
        return cls("F" * _positive(num_layers, "num_layers"))

    @classmethod
    def uniform(cls, num_layers: int, freq: int, offset: int = PAPER_OFFSET) -> IndexCachePattern:
        """F every `freq` layers; `offset=1` is the paper's FSSS..., `offset=2` the official patch's FFSSS...."""
        _positive(num_layers, "num_layers")
        _positive(freq, "freq")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}.")
        return cls("".join("F" if max(i - offset + 1, 0) % freq == 0 else "S" for i in range(num_layers)))

    @classmethod
    def from_ratio(cls, num_layers: int, ratio: float, offset: int = PAPER_OFFSET) -> IndexCachePattern:
        """Keep about `ratio` of the indexers, spread uniformly. A ratio of 1/freq gives `uniform(freq)`."""
        _positive(num_layers, "num_layers")
        if not 0 < ratio <= 1:
            raise ValueError(f"The retention ratio must be in (0, 1], got {ratio}.")
        freq = round(1 / ratio)
        if abs(freq * ratio - 1) < 1e-6:
            return cls.uniform(num_layers, freq, offset)
        # Not 1/integer: place round(ratio * N) F layers as evenly as the layer count allows.
        num_full = max(1, round(ratio * num_layers))
        full = {(i * num_layers) // num_full for i in range(num_full)}
        return cls("".join("F" if i in full else "S" for i in range(num_layers)))

    @classmethod
    def from_config(cls, config: Any) -> IndexCachePattern:
        """Read the pattern a model config declares, in the order the ecosystem gives precedence:
        `index_topk_pattern`, then `indexer_types`, then `index_topk_freq`/`index_skip_topk_offset`, else all F."""
        num_layers = config.num_hidden_layers
        pattern = getattr(config, "index_topk_pattern", None)
        if pattern is not None:
            return cls.parse(pattern if isinstance(pattern, str) else "".join(pattern), num_layers)
        indexer_types = getattr(config, "indexer_types", None)
        if indexer_types is not None:
            inverse = {v: k for k, v in _INDEXER_TYPES.items()}
            unknown = sorted(set(indexer_types) - set(inverse))
            if unknown:
                raise ValueError(f"config.indexer_types holds {unknown}: only 'full' and 'shared' are allowed.")
            return cls.parse("".join(inverse[t] for t in indexer_types), num_layers)
        freq = getattr(config, "index_topk_freq", None)
        if freq is not None:
            return cls.uniform(num_layers, freq, getattr(config, "index_skip_topk_offset", OFFICIAL_OFFSET))
        return cls.all_full(num_layers)

    @classmethod
    def coerce(cls, spec: Any, num_layers: int) -> IndexCachePattern:
        """Accept a pattern, an F/S string, a ratio (a float in (0, 1]), or a uniform schedule given as a
        mapping {"freq": 4, "offset": 1} (offset optional, the paper's by default), for `num_layers` layers."""
        if isinstance(spec, IndexCachePattern):
            spec.check_num_layers(num_layers)
            return spec
        if isinstance(spec, str):
            return cls.parse(spec, num_layers)
        if isinstance(spec, float | int) and not isinstance(spec, bool):
            return cls.from_ratio(num_layers, float(spec))
        if isinstance(spec, Mapping) and set(spec) <= {"freq", "offset"} and "freq" in spec:
            return cls.uniform(num_layers, spec["freq"], spec.get("offset", PAPER_OFFSET))
        raise ValueError(f"Cannot build an IndexCache pattern from {spec!r}: give an F/S string, a ratio, or "
                         "{freq: N, offset: M}.")

    # ----------------------------------------------------------------------------------------- properties
    def __str__(self) -> str:
        return self.layers

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def full_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.layers) if c == "F"]

    @property
    def shared_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.layers) if c == "S"]

    @property
    def retention(self) -> float:
        """The fraction of layers that keep their indexer."""
        return len(self.full_layers) / self.num_layers

    @property
    def groups(self) -> dict[int, list[int]]:
        """Each F layer mapped to the S layers it serves, in layer order."""
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(self.layers):
            if c == "F":
                groups[i] = []
                source = i
            else:
                groups[source].append(i)
        return groups

    def source_layer(self, layer: int) -> int:
        """The F layer whose top-k `layer` uses (itself when it is F)."""
        return self.layers.rfind("F", 0, layer + 1)

    def is_full(self, layer: int) -> bool:
        return self.layers[layer] == "F"

    def with_shared(self, layer: int) -> IndexCachePattern:
        """A copy where `layer` is switched from F to S."""
        if layer == 0:
            raise ValueError("Layer 0 must stay F.")
        if not self.is_full(layer):
            raise ValueError(f"Layer {layer} is already S in {self.layers}.")
        return IndexCachePattern(self.layers[:layer] + "S" + self.layers[layer + 1 :])

    def uniform_schedule(self) -> tuple[int, int] | None:
        """(freq, offset) when the pattern is a uniform schedule of either convention, else None."""
        for offset in (PAPER_OFFSET, OFFICIAL_OFFSET):
            for freq in range(1, self.num_layers + 1):
                if IndexCachePattern.uniform(self.num_layers, freq, offset) == self:
                    return freq, offset
        return None

    def check_num_layers(self, num_layers: int) -> None:
        if self.num_layers != num_layers:
            raise ValueError(
                f"The IndexCache pattern {self.layers!r} has {self.num_layers} characters, "
                f"but the model has {num_layers} DSA layers: give one F/S character per layer."
            )

    # ----------------------------------------------------------------------------------------- export
    def to_config_dict(self) -> dict[str, Any]:
        """The config.json keys that transformers (`indexer_types`), vLLM and SGLang (`index_topk_pattern`,
        else `index_topk_freq` / `index_skip_topk_offset`; SGLang `indexer_types` first) read, and
        `use_index_cache`, which other engines gate on (README, "Loading an export")."""
        keys: dict[str, Any] = {
            "index_topk_pattern": self.layers,
            "indexer_types": [_INDEXER_TYPES[c] for c in self.layers],
            "use_index_cache": bool(self.shared_layers),
        }
        schedule = self.uniform_schedule()
        if schedule is not None:
            keys["index_topk_freq"], keys["index_skip_topk_offset"] = schedule
        return keys


def _positive(value: int, name: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value
