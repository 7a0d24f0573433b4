"""Typed, nested job configs: defaults -> YAML -> CLI ``key=value`` overrides.

Every job has one config dataclass whose fields are dataclasses themselves
(``data``, ``model``, ``loss``, ``optim``, ``scaling``, ``run``). Loading is
strict: an unknown key, a value of the wrong type, a negative number (unless the
config class lists the field in ``SIGNED``) or a URI carrying credentials raises
:class:`ConfigError` naming the dotted key, before any Ray work starts. Workers get the config as a
plain dict (``to_dict``) and rebuild it with ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from sr_ray.core.errors import ConfigError  # re-exported: jobs and tests import it from here
from sr_ray.core.storage import credential_problem, redact

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {_shown(value)}")
        return _build(tp, value, key + ".")
    if origin in (list, Sequence, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_shown(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_shown(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {_shown(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {_shown(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {_shown(value)}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {_shown(value)}")
        problem = credential_problem(str(value))
        if problem:
            raise ConfigError(f"{key}: {problem} is not accepted ({redact(str(value))}); give credentials the "
                              f"standard AWS way (AWS_* environment variables, ~/.aws, an instance or service "
                              f"account role) so they never reach a config file, log or summary")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _shown(value: Any) -> str:
    return redact(repr(value)) if isinstance(value, str) else repr(value)


def _check_signs(cls: type, kwargs: dict[str, Any], prefix: str) -> None:
    """Sizes, counts, rates and steps are never negative: refuse one, naming the key (``SIGNED`` fields excepted)."""
    signed = getattr(cls, "SIGNED", ())
    for k, v in kwargs.items():
        if k not in signed and isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"{prefix}{k}: must be >= 0, got {v}")


def _apply_aliases(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keys a config class renamed (its ``ALIASES``: old key -> new dotted key, both under this section) moved to
    their new place; giving both the old and the new key with different values is refused."""
    aliases: Mapping[str, str] = getattr(cls, "ALIASES", {})
    values = dict(values)
    for old, new in aliases.items():
        if old not in values:
            continue
        value = values.pop(old)
        head, *rest = new.split(".")
        node = values.setdefault(head, {}) if rest else values
        node = dict(node) if isinstance(node, Mapping) else {}
        if rest:
            values[head] = node
            for part in rest[:-1]:
                node[part] = dict(node.get(part) or {})
                node = node[part]
        last = rest[-1] if rest else head
        if last in node and node[last] != value and node[last] != _field_default(cls, new):
            raise ConfigError(f"{prefix}{old} is the older name of {prefix}{new}: give one of them "
                              f"({node[last]!r} and {value!r} were given)")
        node[last] = value
    return values


def _field_default(cls: type, dotted: str) -> Any:
    """The default of a dotted key under ``cls`` (None when it cannot be made)."""
    try:
        node: Any = cls()
        for part in dotted.split("."):
            node = getattr(node, part)
        return node
    except (TypeError, AttributeError, ValueError):
        return None


def _build(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    types_ = _field_types(cls)
    values = _apply_aliases(cls, values, prefix)
    unknown = [k for k in values if k not in types_]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(k, list(types_), n=1)
        extra = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
        raise ConfigError(
            f"unknown config key {prefix}{k}{extra}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(types_))}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in values.items()}
    _check_signs(cls, kwargs, prefix)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def from_dict(cls: type[T], values: Mapping[str, Any] | None) -> T:
    """Build ``cls`` from a nested dict; unknown keys raise :class:`ConfigError`."""
    return _build(cls, dict(values or {}))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (YAML/JSON-safe) of a config dataclass."""
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # "1e-4" is a string to YAML 1.1; numbers are coerced per field type later.
    return key.split("."), value


def set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
"""Presets shipped in the package: ``<job>/<name>.yaml`` (``jobs/configs`` points here)."""


def preset_names(job: str) -> list[str]:
    return sorted(p.stem for p in (PRESET_DIR / job).glob("*.yaml"))


def preset_path(job: str, name: str) -> Path:
    """The file of preset ``name`` of ``job``; ConfigError listing the job's presets when there is none."""
    path = PRESET_DIR / job / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset {name!r} for {job} (presets: {preset_names(job)})")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return dict(loaded)


def expand_presets(tree: dict[str, Any], where: str, depth: int = 0) -> dict[str, Any]:
    """A mapping with ``preset: <job>/<name>`` becomes that preset with the mapping's other keys over it (at any
    level: a sweep's ``train:`` section can be the training job's preset instead of a copy of it)."""
    if depth > 8:
        raise ConfigError(f"{where}: presets nest more than 8 deep (a preset that includes itself?)")
    out = {k: expand_presets(dict(v), where, depth) if isinstance(v, Mapping) else v for k, v in tree.items()}
    ref = out.pop("preset", None)
    if ref is None:
        return out
    if not isinstance(ref, str) or ref.count("/") != 1:
        raise ConfigError(f"{where}: preset: {ref!r} is not of the form <job>/<name>, e.g. train_reward/paper")
    base = expand_presets(_read_yaml(preset_path(*ref.split("/"))), ref, depth + 1)
    return _deep_merge(base, out)


def load_config(
    cls: type[T],
    config_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """defaults (the dataclass) -> YAML file (its ``preset:`` references expanded) -> dotted ``key=value``
    overrides."""
    tree: dict[str, Any] = to_dict(cls())
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = expand_presets(_read_yaml(path), str(path))
        try:
            from_dict(cls, _deep_merge(to_dict(cls()), loaded))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        tree = _deep_merge(tree, loaded)
    for item in overrides:
        path_parts, value = parse_override(item)
        set_dotted(tree, path_parts, value)
    return from_dict(cls, tree)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (local path)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
