"""YAML <-> dataclass engine, schema-agnostic: type coercion, building a dataclass tree with every problem collected,
dotted overrides, plain-dict conversion, differences and an atomic write.

Two field kinds let a registry shape the schema: :func:`choice` (a name that must be a key of a registry, with a
did-you-mean hint) and :func:`sections` (one options dataclass per registry entry, flattened into the parent's YAML
mapping after its own fields: ``objective: {name, mlm: {...}, span: {...}}``). A dataclass with a ``sections``
field derives from :class:`HasSections`, so each section reads as an attribute (``cfg.objective.span``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union

import yaml

#: a registry as the engine sees it: entry name -> its options dataclass (None: the entry has no section)
Registry = Callable[[], Mapping[str, "type | None"]]


class ConfigError(ValueError):
    """One or more configuration problems; the message lists each, with the fix."""


# --------------------------------------------------------------------------- registry-shaped fields


def choice(registry: Registry, default: str, extra: tuple[str, ...] = ()) -> Any:
    """A string field whose value must be a name in ``registry()`` or in ``extra``."""
    return dataclasses.field(default=default, metadata={"choices": lambda: (*extra, *registry())})


def sections(registry: Registry) -> Any:
    """A field holding one options section per registry entry that has an options dataclass (defaults unless set)."""
    return dataclasses.field(default_factory=lambda: default_sections(registry), metadata={"sections": registry})


def default_sections(registry: Registry) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: cls() for name, cls in registry().items() if cls is not None})


class HasSections:
    """Attribute access to the entries of a dataclass's ``sections`` field: ``cfg.objective.span``."""

    def __getattr__(self, name: str):
        try:
            return getattr(self.__dict__["sections"], name)
        except (KeyError, AttributeError):
            raise AttributeError(f"{type(self).__name__} has no attribute or section '{name}'") from None


def changed_fields(options: Any) -> list[str]:
    """Names of the fields of dataclass instance ``options`` that differ from the class defaults."""
    default = type(options)()
    return [f.name for f in dataclasses.fields(options) if getattr(options, f.name) != getattr(default, f.name)]


def _sections_field(cls) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if "sections" in f.metadata), None)


# --------------------------------------------------------------------------- coercion


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _one_of(value: Any, choices: typing.Iterable[Any], key: str) -> Any:
    choices = list(choices)
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise TypeError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; int -> float is the only silent conversion."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except TypeError:
                pass
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise TypeError(f"{key}: expected {names}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise TypeError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        return _one_of(value, typing.get_args(tp), key)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"{key}: unsupported annotation {tp}")


def _type_name(tp) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _yaml_key(f: dataclasses.Field) -> str:
    """A field's key in YAML: its name, or ``metadata["key"]`` where the name cannot be a Python identifier
    (``train.ewc.lambda`` is the field ``lam``)."""
    return f.metadata.get("key", f.name)


# --------------------------------------------------------------------------- building


def build(cls, data: dict, prefix: str, errors: list[str]):
    """Build dataclass ``cls`` from ``data``, appending every problem found to ``errors``."""
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls) if "sections" not in f.metadata}
    section_field = _sections_field(cls)
    section_types = {}
    if section_field is not None:
        section_types = {name: t for name, t in section_field.metadata["sections"]().items() if t is not None}
    kwargs, built_sections = {}, {}
    for key, value in data.items():
        if key in section_types:
            sub = build(section_types[key], value if value is not None else {}, f"{prefix}{key}.", errors)
            if sub is not None:
                built_sections[key] = sub
            continue
        if key not in fields:
            valid = [*fields, *section_types]
            close = closest_key(key, valid)
            hint = f"; did you mean '{prefix}{close}'?" if close else f"; valid keys: {', '.join(valid)}"
            errors.append(f"unknown key '{prefix}{key}'{hint}")
            continue
        f = fields[key]
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            sub = build(tp, value if value is not None else {}, f"{prefix}{key}.", errors)
            if sub is not None:
                kwargs[f.name] = sub
            continue
        try:
            kwargs[f.name] = _coerce(value, tp, prefix + key)
            if "choices" in f.metadata:
                _one_of(kwargs[f.name], f.metadata["choices"](), prefix + key)
        except TypeError as e:
            errors.append(str(e))
    if errors:
        return None
    if section_field is not None:
        kwargs[section_field.name] = types.SimpleNamespace(
            **{name: built_sections.get(name) or t() for name, t in section_types.items()})
    try:
        return cls(**kwargs)
    except ValueError as e:
        errors.append(str(e))
        return None


def closest_key(key: str, valid: list[str]) -> str | None:
    """The valid key a typo'd ``key`` most likely means: one it extends or abbreviates at a word boundary
    (``lr_rate`` -> ``lr``, ``warmup`` -> ``warmup_steps``), else the closest spelling (difflib), else None."""
    def extends(longer: str, shorter: str) -> bool:
        return longer.startswith(shorter) and longer[len(shorter)] in "_."

    related = [v for v in valid if v != key and len(v) != len(key) and
               (extends(key, v) if len(key) > len(v) else extends(v, key))]
    if related:
        return max(related, key=lambda v: difflib.SequenceMatcher(None, key, v).ratio())
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def build_root(cls, data: dict):
    """``cls`` built from plain data (YAML floats fixed), or a :class:`ConfigError` listing every problem."""
    errors: list[str] = []
    cfg = build(cls, fix_yaml_floats(data), "", errors)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg


def fix_yaml_floats(node: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; turn such strings back into floats."""
    if isinstance(node, dict):
        return {k: fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [fix_yaml_floats(v) for v in node]
    if isinstance(node, str):
        try:
            if any(c in node for c in "eE") and any(c.isdigit() for c in node):
                return float(node)
        except ValueError:
            return node
    return node


# --------------------------------------------------------------------------- files and overrides


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``dotted = "a.b"``, creating (or replacing non-mapping) parents."""
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=3e-4", "data.files=[a.txt,b.txt]"]`` -> [(dotted key, YAML-parsed value)]."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); fix it, or "
                              f"quote a literal string: {key}='\"{raw}\"'") from None
        parsed.append((key.strip(), value))
    return parsed


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's one-line description of ``error`` (without its multi-line excerpt of the input)."""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return ", ".join(p for p in parts if p) or str(error).splitlines()[0]


def read_tree(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The mapping in YAML file ``path`` (empty when None) with the dotted overrides applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: invalid YAML: {_yaml_problem(e)}; fix the file there") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    return data


def to_dict(node: Any) -> Any:
    """A dataclass tree as plain data under its YAML keys (what :func:`build` reads back); sections follow their
    parent's own fields."""
    if dataclasses.is_dataclass(node):
        out = {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if "sections" in f.metadata:
                out.update({name: to_dict(v) for name, v in vars(value).items()})
            else:
                out[_yaml_key(f)] = to_dict(value)
        return out
    if isinstance(node, list):
        return [to_dict(v) for v in node]
    return node


def write_yaml_atomic(data: dict, path: str | Path) -> None:
    """Write ``data`` as YAML atomically (temporary file + rename): readers see either no file or a whole one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def differences(old: dict, new: dict, ignore: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain trees; a key in ``ignore``, or under one (a trailing ``.``
    is allowed), is skipped."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        dotted = prefix + key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, ignore, dotted + ".")
        elif a != b and not any(dotted == k.rstrip(".") or dotted.startswith(k.rstrip(".") + ".") for k in ignore):
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs
