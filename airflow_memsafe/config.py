"""All tunables in one place: the fields of :class:`MemsafeSettings`.

Each field carries its description, unit and range (:class:`SettingInfo`, in the field's
metadata); everything else is derived from the fields: validation (type, range, one-line
errors), the ``[memsafe]`` section of ``get_provider_info()``, the CLI flags of
``airflow-memsafe extract``, the operator's keyword arguments and the settings tables of
README.md and docs/configuration.md (``scripts/gen_settings_docs.py``). A new field needs
nothing else.

Precedence: explicit arguments (operator / CLI) > the ``[memsafe]`` Airflow config section or
``AIRFLOW__MEMSAFE__<NAME>`` environment variables > the defaults below. The engine reads the
environment itself so it works without Airflow; the operator also consults Airflow's config.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from functools import cache
from typing import Any

from airflow_memsafe.errors import PermanentError

__all__ = [
    "NODE_INDEXES",
    "InvalidSettingError",
    "MemsafeSettings",
    "SettingInfo",
    "SettingSpec",
    "coerce_setting",
    "env_lookup",
    "parse_bool",
    "provider_config",
    "setting_specs",
    "take_settings",
]

#: Node-location index choices: ``auto`` (by file size vs budget) or an osmium index name.
NODE_INDEXES = ("auto", "flex_mem", "sparse_mem_array", "sparse_file_array")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "", "none")  # "None": a rendered template of None
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_VERSION = "0.1.0"


class InvalidSettingError(PermanentError, ValueError):
    """A setting of the wrong type or out of range (one line, names the setting)."""


@dataclass(frozen=True)
class SettingInfo:
    """What a caller needs to know about one setting (kept in the field's metadata)."""

    description: str
    #: Unit of the value (``MB``, ``s``, ``%``, ``objects``); empty for none.
    unit: str = ""
    #: Inclusive bounds; ``above``: exclusive lower bound.
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    #: Docs: what the default means when it is computed (``None``), e.g. "the cgroup limit".
    default_text: str | None = None
    example: str | None = None
    version_added: str = _VERSION


def _setting(default: Any, description: str, **info: Any) -> Any:
    return field(default=default, metadata={"memsafe": SettingInfo(description, **info)})


@dataclass(frozen=True)
class MemsafeSettings:
    """Engine settings. Sizes carry their unit in the name. Values given as strings (config,
    environment, rendered templates) are parsed; wrong types and ranges raise
    :class:`InvalidSettingError`."""

    batch_size: int = _setting(
        2000,
        "Objects handed to the metric computation per micro-batch (WKB strings held at once).",
        unit="objects",
        minimum=1,
    )
    min_batch_size: int = _setting(
        64,
        "Floor of the adaptive batch size under memory pressure (capped at batch_size).",
        unit="objects",
        minimum=1,
    )
    memory_limit_mb: int | None = _setting(
        None,
        "The worker's memory budget; unset: read from the cgroup (v2 memory.max, v1 "
        "memory.limit_in_bytes), else the machine's RAM.",
        unit="MB",
        minimum=64,
        default_text="the cgroup limit",
        example="1024",
    )
    warning_pct: float = _setting(
        80.0,
        "Working set (percent of the limit) at which the batch size is halved.",
        unit="%",
        above=0,
        maximum=100,
    )
    critical_pct: float = _setting(
        90.0,
        "Working set at which batches are flushed, memory released and the batch size "
        "dropped to the floor.",
        unit="%",
        above=0,
        maximum=100,
    )
    hard_limit_pct: float = _setting(
        95.0,
        "Working set at which the type stops with MemoryBudgetExceeded (the others still run), "
        "unless flushing and releasing memory brings it back under critical_pct.",
        unit="%",
        above=0,
        maximum=100,
    )
    sample_interval_s: float = _setting(
        0.5, "Seconds between background memory samples.", unit="s", above=0
    )
    spill_threshold_mb: int | None = _setting(
        None,
        "Largest in-memory node-location index; bigger (estimated) indexes spill to a "
        "file-backed sparse_file_array.",
        unit="MB",
        minimum=0,
        default_text="a quarter of the limit, at most 32 MB",
        example="32",
    )
    max_input_mb: int | None = _setting(
        None,
        "Circuit breaker: refuse PBF inputs larger than this (the memory estimate still applies).",
        unit="MB",
        minimum=0,
        default_text="no cap",
        example="2048",
    )
    max_concurrency: int = _setting(
        1, "Extraction tasks allowed to run at once on one host (file-lock slots).", minimum=1
    )
    slots_dir: str | None = _setting(
        None,
        "Directory of the slot lock files; tasks sharing it share the slots.",
        default_text="<tmp>/airflow-memsafe-slots",
        example="/var/lib/airflow/memsafe-slots",
    )
    node_index: str = _setting(
        "auto",
        "Node-location index: auto chooses by file size vs budget, or force an osmium index.",
        choices=NODE_INDEXES,
    )
    index_dir: str | None = _setting(
        None,
        "Directory for file-backed node indexes (not a tmpfs: that counts as memory).",
        default_text="the system temp dir",
        example="/var/lib/airflow/osm-index",
    )
    osmdata_queue_size: int = _setting(
        1,
        "libosmium read-ahead queue of decoded buffers (OSMIUM_MAX_OSMDATA_QUEUE_SIZE); small "
        "values bound memory when per-object work is slower than decoding (1 instead of 2: "
        "-23 MB on osmium-written blocks, which reach ~5 MB).",
        unit="buffers",
        minimum=1,
    )
    input_queue_size: int = _setting(
        1,
        "libosmium queue of raw input blocks (OSMIUM_MAX_INPUT_QUEUE_SIZE).",
        unit="buffers",
        minimum=1,
    )
    max_classes: int = _setting(
        200,
        "Distinct tag values kept in the per-class breakdown; the rest count as __other__.",
        minimum=1,
    )
    relation_budget_mb: float | None = _setting(
        None,
        "Largest estimated store of candidate multipolygon relations in the area assembler "
        "(~150 B per member + 0.9 KB per relation in RAM); past it the relations are assembled in "
        "groups (the later ones from a spill file each), and relations with member ways "
        "missing from the file are left out.",
        unit="MB",
        above=0,
        default_text="16 MB, or half the headroom under the hard limit if smaller",
        example="48",
    )
    force_gc: bool = _setting(True, "Run gc.collect() and malloc_trim(0) between feature types.")
    progress_interval_s: float = _setting(
        10.0,
        "Seconds between progress lines in the task log while a pass runs (% read, objects/s, "
        "ETA); the CLI shows a bar on a terminal instead.",
        unit="s",
        above=0,
    )
    types_module: str | None = _setting(
        None,
        "Python module (dotted name) imported before feature type names are resolved: its "
        "register_feature_type(...) calls make its types known by name (operator "
        "feature_types, CLI --types).",
        default_text="none",
        example="my_company.osm_types",
    )

    def __post_init__(self) -> None:
        for spec in setting_specs():
            object.__setattr__(self, spec.name, spec.coerce(getattr(self, spec.name)))
        if not self.warning_pct < self.critical_pct < self.hard_limit_pct:
            raise InvalidSettingError(
                "need warning_pct < critical_pct < hard_limit_pct, got "
                f"{self.warning_pct}, {self.critical_pct}, {self.hard_limit_pct}"
            )

    @classmethod
    def resolve(
        cls,
        overrides: Mapping[str, Any] | None = None,
        lookup: Callable[[str], str | None] | None = None,
    ) -> MemsafeSettings:
        """Defaults, then values from ``lookup(name)`` (config/env), then ``overrides``
        (None or "" in either: not given). Unknown override names raise ``TypeError``."""
        lookup = lookup or env_lookup
        known = {spec.name: spec for spec in setting_specs()}
        unknown = set(overrides or {}) - set(known)
        if unknown:
            raise TypeError(
                f"unknown setting(s): {', '.join(sorted(unknown))}; known: {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for name, spec in known.items():
            raw = lookup(name)
            if _given(raw):
                try:
                    values[name] = spec.coerce(raw)
                except InvalidSettingError as exc:
                    raise InvalidSettingError(
                        f"{exc} (from [memsafe] {name} or AIRFLOW__MEMSAFE__{name.upper()})"
                    ) from None
        values.update({k: v for k, v in (overrides or {}).items() if _given(v)})
        return cls(**values)


@dataclass(frozen=True)
class SettingSpec:
    """One field of :class:`MemsafeSettings` with its type, as the generators need it."""

    name: str
    kind: type  # int, float, bool or str
    optional: bool  # None allowed
    default: Any
    info: SettingInfo

    @property
    def type_name(self) -> str:
        """Airflow's config type names (``integer``, ``float``, ``boolean``, ``string``)."""
        return {int: "integer", float: "float", bool: "boolean"}.get(self.kind, "string")

    @property
    def default_text(self) -> str:
        """The default as docs show it."""
        if self.default is None:
            return self.info.default_text or "none"
        if self.kind is bool:
            return "true" if self.default else "false"
        return f"{self.default:g}" if self.kind is float else str(self.default)

    @property
    def bounds_text(self) -> str:
        """Allowed values, e.g. ``>= 1``, ``> 0, <= 100``, ``auto | flex_mem``."""
        if self.info.choices:
            return " | ".join(self.info.choices)
        parts = []
        if self.info.above is not None:
            parts.append(f"> {self.info.above:g}")
        if self.info.minimum is not None:
            parts.append(f">= {self.info.minimum:g}")
        if self.info.maximum is not None:
            parts.append(f"<= {self.info.maximum:g}")
        return ", ".join(parts)

    def coerce(self, value: Any) -> Any:
        """``value`` checked (and parsed from a string) for this setting; raises
        :class:`InvalidSettingError` with one line naming it."""
        if value is None or (
            self.optional and isinstance(value, str) and value.strip().lower() in ("", "none")
        ):
            if self.optional:
                return None
            raise InvalidSettingError(f"{self.name} must be given, not None")
        if self.kind is bool:
            return parse_bool(value, self.name)
        if self.kind is str:
            return self._check_text(value)
        number = self._number(value)
        info = self.info
        if (
            (info.above is not None and not number > info.above)
            or (info.minimum is not None and not number >= info.minimum)
            or (info.maximum is not None and not number <= info.maximum)
        ):
            raise InvalidSettingError(f"{self.name} must be {self.bounds_text}, not {value!r}")
        return number

    def _number(self, value: Any) -> int | float:
        what = "an integer" if self.kind is int else "a number"
        unit = f" ({self.info.unit})" if self.info.unit else ""
        if isinstance(value, str):
            try:
                number: int | float = self.kind(value.strip())
            except ValueError:
                number = math.nan
        elif isinstance(value, bool) or not isinstance(value, int | float):
            number = math.nan
        elif self.kind is int and isinstance(value, float):
            number = math.nan  # 2.5 objects: no silent truncation
        else:
            number = self.kind(value)
        if not math.isfinite(number):
            raise InvalidSettingError(f"{self.name} must be {what}{unit}, not {value!r}")
        return number

    def _check_text(self, value: Any) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise InvalidSettingError(f"{self.name} must be a string, not {value!r}")
        if self.info.choices and value not in self.info.choices:
            raise InvalidSettingError(
                f"{self.name} must be one of {', '.join(self.info.choices)}, not {value!r}"
            )
        if self.name == "types_module" and not _MODULE_RE.fullmatch(value):
            raise InvalidSettingError(
                f"types_module must be a dotted module name (e.g. my_pkg.osm_types), not {value!r}"
            )
        return value


@cache
def setting_specs() -> tuple[SettingSpec, ...]:
    """The fields of :class:`MemsafeSettings`, in order, with their types and metadata. A
    field without :class:`SettingInfo` still works everywhere (with an empty description;
    a test requires one)."""
    hints = typing.get_type_hints(MemsafeSettings)
    return tuple(_spec(f, hints[f.name]) for f in fields(MemsafeSettings))


def _spec(f: Field[Any], hint: Any) -> SettingSpec:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float, bool, str):
        raise TypeError(f"setting {f.name}: unsupported type {hint!r}")
    info = f.metadata.get("memsafe") or SettingInfo("")
    return SettingSpec(f.name, kinds[0], len(args) > len(kinds), f.default, info)


def parse_bool(value: Any, name: str) -> bool:
    """A flag that may arrive as text (config, environment, a rendered template:
    ``"True"``, ``"false"``, ``"1"``, ``"off"``; empty, ``"None"`` and None are false)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise InvalidSettingError(f"{name} must be a boolean (true/false), not {value!r}")


def coerce_setting(name: str, value: Any) -> Any:
    """``value`` checked for setting ``name`` (type and range, strings parsed), no I/O."""
    for spec in setting_specs():
        if spec.name == name:
            return spec.coerce(value)
    raise TypeError(f"unknown setting: {name}")


def take_settings(
    settings: MemsafeSettings | Mapping[str, Any] | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The settings an operator was given, later ones winning: setting names in the task's
    ``default_args`` (the DAG's merged in, as Airflow hands them to ``__init__``), then
    ``settings`` (a mapping of setting names, or a :class:`MemsafeSettings`: all its
    fields), then the keyword arguments named like a setting, which are removed from
    ``kwargs``. Values are not checked here (they may be templates)."""
    names = [spec.name for spec in setting_specs()]
    if isinstance(settings, MemsafeSettings):
        chosen = {name: getattr(settings, name) for name in names}
    elif isinstance(settings, Mapping):
        chosen = dict(settings)
    elif settings is None:
        chosen = {}
    else:
        raise TypeError(f"settings must be a mapping or MemsafeSettings, not {settings!r}")
    unknown = set(chosen) - set(names)
    if unknown:
        raise TypeError(
            f"unknown setting(s): {', '.join(sorted(unknown))}; known: {', '.join(names)}"
        )
    defaults = kwargs.get("default_args") or {}
    given = {name: defaults[name] for name in names if name in defaults}
    given.update(chosen)
    given.update({name: kwargs.pop(name) for name in names if name in kwargs})
    return given


def provider_config() -> dict[str, Any]:
    """The ``[memsafe]`` section as ``get_provider_info()["config"]`` lists it."""
    options: dict[str, Any] = {}
    for spec in setting_specs():
        description = spec.info.description
        if spec.bounds_text:
            description += f" Allowed: {spec.bounds_text}."
        if spec.info.unit:
            description += f" Unit: {spec.info.unit}."
        if spec.default is None:
            description += f" Empty: {spec.default_text}."
        default = "" if spec.default is None else spec.default_text
        options[spec.name] = {
            "description": description,
            "version_added": spec.info.version_added,
            "type": spec.type_name,
            "example": spec.info.example or default,
            "default": default,
        }
    return {
        "memsafe": {
            "description": "Settings of airflow-memsafe operators (MemsafeSettings); the "
            "environment variable AIRFLOW__MEMSAFE__<NAME> sets one as well.",
            "options": options,
        }
    }


def env_lookup(name: str) -> str | None:
    """``AIRFLOW__MEMSAFE__<NAME>`` from the environment."""
    return os.environ.get(f"AIRFLOW__MEMSAFE__{name.upper()}")


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())
