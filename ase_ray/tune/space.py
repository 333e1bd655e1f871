"""Search spaces: YAML files in ``tune_spaces/`` that map dotted config paths to value specs.

```yaml
description: PFA stride x learning rate      # optional
num_samples: 2                               # optional: samples of the space (grids repeat this often)
metric: val_macro_f1                         # optional: overrides tune.metric / tune.mode
mode: max
fixed:                                       # optional: settings every trial of this space uses
  train.epochs: 20
params:                                      # required: what the trials vary
  train.pfa.stride: {grid: [0.1, 0.2, 0.3]}  # every value, in every sample
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}   # also: choice [...], uniform [lo, hi], randint [lo, hi)
```

Only ``train.*`` settings can be searched: every trial trains on the same feature store. Every path
and every value a spec can produce (each grid/choice value, both ends of a range) is validated
against :class:`~ase_ray.config.AppConfig` before anything starts; a wrong one is a
:class:`ConfigError` that names the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ase_ray.config import AppConfig, apply_overrides, check_key
from ase_ray.errors import ConfigError

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = ("description", "num_samples", "metric", "mode", "fixed", "params")
RESERVED = ("train.run_name", "train.storage_path", "train.store_dir")
NOT_SEARCHABLE = ("train.task",)  # may be fixed, not varied: trials of one search must be comparable

# The small search of `ase-ray pipeline` (pipeline.tune_space unset): 2 trials of 1 worker each.
PIPELINE_SPACE: dict[str, Any] = {
    "description": "ase-ray pipeline: a small PFA stride x learning rate search (2 trials)",
    "num_samples": 1,
    "fixed": {
        "train.epochs": 12,
        "train.num_workers": 1,
        "train.cpus_per_worker": 0.9,
        "train.pfa.epochs_per_stage": 2,
    },
    "params": {
        "train.pfa.stride": {"grid": [0.2, 0.4]},
        "train.lr": {"loguniform": [5.0e-4, 3.0e-3]},
    },
}


@dataclass
class Param:
    path: str
    kind: str
    args: list[Any]

    def candidates(self) -> list[Any]:
        """Values to validate: every listed value, or the ends of a range."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        lo, hi = self.args
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*([self.args] if self.kind == "choice" else self.args))

    def describe(self) -> str:
        return f"{self.kind} {json.dumps(self.args)}"


@dataclass
class SearchSpace:
    source: str
    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    num_samples: int | None = None
    metric: str | None = None
    mode: str | None = None
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def largest(self, path: str, default: Any) -> Any:
        """The largest value ``path`` takes in this space (searched, fixed or ``default``)."""
        for param in self.params:
            if param.path == path:
                return max(param.candidates())
        return self.fixed.get(path, default)

    def param_space(self) -> dict[str, Any]:
        """The Tuner's ``param_space``: one entry per dotted path."""
        return {p.path: p.to_tune() for p in self.params}

    def trial_count(self, num_samples: int) -> int:
        """Trials the space makes with ``num_samples`` (grids multiply)."""
        grid = math.prod(len(p.args) for p in self.params if p.kind == "grid")
        return grid * num_samples


def load_space(path: str | Path, base: AppConfig) -> SearchSpace:
    """Read and validate a search-space YAML file against ``base``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"search space {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"search space {path} is not valid YAML{where}") from None
    if data is None:
        raise ConfigError(f"search space {path} is empty: it needs at least 'params' (see tune_spaces/)")
    return parse_space(data, str(path), base)


def parse_space(data: Any, source: str, base: AppConfig) -> SearchSpace:
    """Validate a space given as a mapping (see the module docstring for the format)."""
    where = f"search space {source}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping at the top, not {type(data).__name__}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(TOP_KEYS)})")
    params_raw = data.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{where}: 'params' must map config paths to specs, "
                          "e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{where}: 'fixed' must map config paths to values")
    params = [_parse_param(str(path), spec, where) for path, spec in params_raw.items()]
    for key in fixed:
        _check_searchable(str(key), where, varied=False)
    both = sorted(set(fixed) & {p.path for p in params})
    if both:
        raise ConfigError(f"{where}: {both[0]!r} is both fixed and searched")
    num_samples = data.get("num_samples")
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        raise ConfigError(f"{where}: num_samples must be an integer >= 1, got {num_samples!r}")
    space = SearchSpace(source, params, {str(k): v for k, v in fixed.items()}, num_samples,
                        data.get("metric"), data.get("mode"), str(data.get("description") or ""), data)
    _validate_values(space, base, where)
    return space


def _parse_param(path: str, spec: Any, where: str) -> Param:
    _check_searchable(path, where, varied=True)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: {path!r} must be one spec like {{grid: [...]}} (one of {', '.join(SPEC_KINDS)}), "
                          f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in SPEC_KINDS:
        raise ConfigError(f"{where}: {path!r} has unknown spec {kind!r} (valid: {', '.join(SPEC_KINDS)})")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {path!r}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numbers = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if kind == "randint":
            numbers = numbers and all(isinstance(a, int) for a in args)
        if not numbers or not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
            need = {"uniform": "lo < hi", "loguniform": "0 < lo < hi",
                    "randint": "integers lo < hi (hi excluded)"}[kind]
            raise ConfigError(f"{where}: {path!r}: {kind} needs [lo, hi] with {need}, got {args!r}")
    return Param(path, kind, list(args))


def _check_searchable(path: str, where: str, varied: bool) -> None:
    try:
        check_key(path)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not path.startswith("train.") or path in RESERVED:
        raise ConfigError(f"{where}: {path!r} cannot be set by a search (only train.* settings, and not "
                          f"{', '.join(RESERVED)}): every trial trains on the same feature store")
    if varied and path in NOT_SEARCHABLE:
        raise ConfigError(f"{where}: {path!r} can be fixed but not searched: trials of one search must be comparable")


def _validate_values(space: SearchSpace, base: AppConfig, where: str) -> None:
    def attempt(values: Mapping[str, Any], what: str) -> None:
        try:
            apply_overrides(base, values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {what}: {exc}") from None

    firsts = {p.path: p.candidates()[0] for p in space.params}
    for param in space.params:  # each value with the fixed settings and the other params' first values
        for value in param.candidates():
            attempt({**space.fixed, **firsts, param.path: value}, f"{param.path!r} = {value!r}")
    overrides = {k: v for k, v in (("tune.metric", space.metric), ("tune.mode", space.mode)) if v is not None}
    if overrides:
        attempt(overrides, "metric/mode")


def trial_config(base: AppConfig, fixed: Mapping[str, Any], sampled: Mapping[str, Any],
                 extra: Mapping[str, Any] | None = None) -> AppConfig:
    """The config of one trial: the base, the space's fixed settings, the sampled values, then ``extra``."""
    values = {**fixed, **{k: plain(v) for k, v in sampled.items()}, **(extra or {})}
    return apply_overrides(base, values)


def plain(value: Any) -> Any:
    """numpy scalars (Tune samples them) to Python numbers, for YAML/JSON and pydantic."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value
