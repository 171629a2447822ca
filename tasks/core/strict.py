"""Strict building of typed configs: a mapping (parsed YAML) becomes a dataclass, or a ConfigError names
the key, what was expected and what was given (a long value cut, so it cannot flood the message).

`build(cls, data)` refuses unknown keys and wrong types (int -> float is the one coercion) recursively;
`plain_yaml` parses YAML without anchors or aliases; `parse_override` turns `a.b.c=value` into a nested
mapping with a YAML-typed value. tasks/core/config.py uses them to resolve and load params.yaml.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the file it came from."""


MESSAGE_VALUE_CHARS = 60  # a value shown in an error message is cut to this
MAX_SET_CHARS = 4096  # one --set item


def cut(text: str) -> str:
    """text for an error message, cut so that a huge value cannot flood the message."""
    return (
        text if len(text) <= MESSAGE_VALUE_CHARS else text[:MESSAGE_VALUE_CHARS] + f"...<{len(text)} chars>"
    )


def show(value: Any) -> str:
    return cut(repr(value))


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return value coerced to tp (int -> float allowed), or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {show(value)}")
        return build(tp, value, where)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {show(value)}")
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _check_value(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {show(value)}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {show(value)}")
    return value


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        listed = ", ".join(cut(prefix + str(k)) for k in unknown[:5])
        raise ConfigError(
            f"unknown config key(s) {listed}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def plain_yaml(text: str, where: str) -> Any:
    """yaml.safe_load without anchors or aliases (an alias bomb expands to billions of items when the
    value is walked); any YAML error is a ConfigError naming `where`."""
    try:
        for token in yaml.scan(text):
            if isinstance(token, yaml.AnchorToken | yaml.AliasToken):
                raise ConfigError(f"{where}: YAML anchors and aliases (&, *) are not allowed in a value")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not a YAML value ({cut(problem)}); quote it") from None


def parse_override(item: str) -> dict[str, Any]:
    """'pretrain.train.max_steps=2000' -> {'pretrain': {'train': {'max_steps': 2000}}} (YAML-typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {show(item)}: expected key=value, e.g. pretrain.train.max_steps=2000")
    key, raw = item.split("=", 1)
    if len(item) > MAX_SET_CHARS:
        raise ConfigError(f"--set {cut(key)}: {len(item)} characters, more than {MAX_SET_CHARS}")
    value = plain_yaml(raw, f"--set {key}") if raw != "" else ""
    node: dict[str, Any] = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node
