"""Typed YAML configs: nested dataclasses filled from a YAML file, with one clear error per unknown or bad key.

``load_config(CptConfig, "run.yaml", overrides=["train.max_steps=10"])`` reads the file, applies dotted
``key=value`` overrides (values parsed as YAML), and returns the dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _strip_optional(t):
    if typing.get_origin(t) is Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def from_dict(cls, data: Optional[dict], where: str = ""):
    """Build dataclass ``cls`` from ``data`` (nested dicts), rejecting unknown keys."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config {where or 'root'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"config {where or 'root'}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        t = _strip_optional(hints[f.name])
        key = f"{where}.{f.name}" if where else f.name
        if _is_dataclass_type(t):
            if not (isinstance(value, dict) or value is None):   # e.g. `data: [1, 2]` or --set train=3
                raise ValueError(f"config {key}: expected a section (a mapping of keys), got {value!r}")
            value = from_dict(t, value, key)
        elif typing.get_origin(t) in (list, List) and value is not None:
            if not isinstance(value, list):     # a bare string would be read as a list of its characters
                raise ValueError(f"config {key}: expected a list, got {value!r} (write [{value}])")
            item = (typing.get_args(t) or (object,))[0]
            ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
                  float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  str: lambda v: isinstance(v, str)}.get(item)
            if ok is not None and not all(ok(v) for v in value):
                raise ValueError(f"config {key}: expected a list of {item.__name__}, got {value!r}")
        elif t is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError as exc:
                raise ValueError(f"config {key}: expected a number, got {value!r}") from exc
        elif t is str and isinstance(value, bool):       # YAML reads true/false as booleans (e.g. bf16: true)
            value = str(value).lower()
        elif t is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif t in (int, float, bool, str) and value is not None and not isinstance(value, t):
            raise ValueError(f"config {key}: expected {t.__name__}, got {value!r}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        msg = str(exc)   # a nested section's error already names its key: no second prefix
        raise ValueError(msg if msg.startswith("config ") else f"config {where or 'root'}: {msg}") from exc


def to_dict(obj) -> Any:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    import yaml

    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"invalid YAML in override {item!r}: {exc}") from None
    return data


def load_config(cls, path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()):
    """Read a YAML file (or nothing) into dataclass ``cls`` after applying ``overrides``."""
    import yaml

    data = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:   # its position says line/column; name the file, not "<unicode string>"
            raise ValueError(f"invalid YAML in config file {p}: {str(exc).replace('<unicode string>', str(p))}") \
                from None
    return from_dict(cls, apply_overrides(data, list(overrides)))


def dump_config(obj, path: Union[str, Path]) -> None:
    import yaml

    from .fsutil import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))   # a full disk names the file
