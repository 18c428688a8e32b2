"""How a setting carries its rule, and how a group of settings is checked against its schema.

A schema (formats/config.py) is a dataclass whose fields are `setting()`s: the field's range or
choices ride in its metadata (`setting(ge=1)`, `setting(min_items=1)` for a list), and one walk
checks them all (`check_section`), so a new key gets its check where it is declared:
`training.grad_clip=-1`, which would turn descent into ascent, fails as
`config key training.grad_clip=-1.0 must be > 0`. A number is also always finite: `inf` and `nan`
pass no setting.

Merging a config into a schema (OmegaConf structured configs) refuses unknown keys and wrong
types: `training.max_steps=abc`, and `data.tasks=close_jar`, a string where a list belongs that
would otherwise be read as the list of its characters. Hydra's struct mode already refuses unknown
keys given on the command line; the schema also catches those mistyped in YAML. Every refusal is
a ValueError that names the key as the user wrote it (`<group>.<field>`), whichever schema it
came from, so this module knows no particular schema.
"""

from __future__ import annotations

import math
import operator
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def setting(default: Any = MISSING, *, factory=None, ge=None, gt=None, le=None, lt=None, choices=None,
            min_items=None, max_items=None, unique=None):
    """A schema field. `ge`, `gt`, `le`, `lt` bound a number (each number of a list); `choices` is
    a tuple of allowed values, or a function returning them (a registry plugins may extend);
    `min_items`, `max_items` bound the length of a list; `unique` refuses a list naming an item
    twice. Without a default the key is required."""
    given = (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices), ("min_items", min_items),
             ("max_items", max_items), ("unique", unique))
    rules = {k: v for k, v in given if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="), ("lt", operator.lt, "<"))


def check_section(key: str, schema: type, node, open_keys: bool = False) -> DictConfig:
    """`node` (a mapping) merged over `schema`'s defaults and checked, or ValueError naming the key
    (`<key>.<field>`). With `open_keys`, keys the schema does not declare are left unchecked."""
    node = plain(node)
    if not isinstance(node, dict):
        raise ValueError(f"config key {key or '<root>'} must be a mapping of keys, got {node!r}")
    if open_keys:
        declared = {f.name for f in fields(schema)}
        node = {k: v for k, v in node.items() if k in declared}
    merged = over_defaults(key, schema, node)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ValueError(f"config key {join_key(key, missing[0])} is missing: set it in the config or on the command line")
    _check_rules(key, schema, merged)
    return merged


def typed_section(key: str, schema: type, node):
    """`node` merged over `schema`'s defaults and checked (`check_section`), as an instance of
    `schema`: what the code reads, every value of its declared type."""
    return OmegaConf.to_object(check_section(key, schema, node))


def over_defaults(key: str, schema: type, node: dict) -> DictConfig:
    """`node` merged over `schema`'s defaults, unknown and mistyped keys refused naming them;
    required keys and ranges are left to `check_section`, for a reader that runs before them."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as err:
        raise ValueError(_merge_error(key, node, err)) from None


def check_schema(schema, base: type, call: str) -> None:
    """A registered schema (None: none) must extend `base`, whose keys every thing of its kind
    shares and is checked on (`DataConfig`, `EncoderConfig`); TypeError naming the `call` otherwise."""
    if schema is not None and not (isinstance(schema, type) and issubclass(schema, base)):
        raise TypeError(f"{call}: the schema must be a subclass of {base.__name__}")


def plain(node):
    """A config (OmegaConf or plain) as plain dicts and lists, interpolations resolved."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, (dict, list)):
        return OmegaConf.to_container(OmegaConf.create(node), resolve=True)
    return node


def join_key(key: str, name: str) -> str:
    """The dotted key of `name` under `key` ("" at the root)."""
    return f"{key}.{name}" if key else name


def _merge_error(key: str, node: dict, err: OmegaConfBaseException) -> str:
    full_key = getattr(err, "full_key", None) or "?"
    name = join_key(key, full_key)
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    value = OmegaConf.select(OmegaConf.create(node), full_key, default=None) if full_key != "?" else None
    if "is not a ListConfig" in message:
        return f"config key {name}={value!r} must be a list, e.g. {name}=[{value}]"
    if "not in" in message and "Key" in message:
        return f"config key {name} is unknown ({message})"
    return f"config key {name}: {message}"


def _check_rules(key: str, schema: type, node) -> None:
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        name, value = join_key(key, f.name), node[f.name]
        if value is None:
            continue
        nested = _dataclass_in(hints[f.name])
        if nested is not None:
            if isinstance(value, ListConfig):
                for i, item in enumerate(value):
                    _check_rules(f"{name}[{i}]", nested, item)
            elif isinstance(value, DictConfig) and not is_dataclass(OmegaConf.get_type(value)):
                for item_key, item in value.items():
                    _check_rules(f"{name}.{item_key}", nested, item)
            else:
                _check_rules(name, nested, value)
            continue
        _check_value(name, value, f.metadata)


def _check_value(name: str, value, rules) -> None:
    choices = rules.get("choices")
    if callable(choices):
        choices = choices()
    if isinstance(value, ListConfig):
        _check_length(name, list(value), rules.get("min_items", 0), rules.get("max_items"))
        twice = sorted({str(item) for item in value if list(value).count(item) > 1})
        if rules.get("unique") and twice:
            raise ValueError(f"config key {name}={list(value)} names {twice} more than once; name each once")
    for item in value if isinstance(value, ListConfig) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"config key {name}={_shown(value)} must be a finite number")
        if choices is not None and item not in choices:
            raise ValueError(f"config key {name}={item!r}; choose from {tuple(choices)}")
        for rule, holds, words in BOUNDS:
            if rule in rules and not holds(item, rules[rule]):
                raise ValueError(f"config key {name}={_shown(value)} must be {words} {rules[rule]}")


def _check_length(name: str, items: list, least: int, most: int | None) -> None:
    if least <= len(items) and (most is None or len(items) <= most):
        return
    wanted = f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
    raise ValueError(f"config key {name}={items} must hold {wanted} item(s)")


def _shown(value):
    return list(value) if isinstance(value, ListConfig) else value


def _dataclass_in(hint) -> type | None:
    """The dataclass a field holds: itself, or inside `X | None`, `list[X]`, `dict[str, X]`."""
    if is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None
