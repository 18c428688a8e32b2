"""One registration per encoder: the class that builds it and the schema of its config keys, in
one call, as a dataset registers its builder and schema (drifting_vla/data/registry.py).

    @register_vision_encoder("my_backbone", schema=MyBackboneConfig)   # model.vision.name: my_backbone
    class MyBackbone(nn.Module): ...

The class goes into the registry the model is built from (`VISION_BACKBONES`, `LANGUAGE_ENCODERS`)
and the schema into the one a config is checked against (`VISION_SCHEMAS`, `LANGUAGE_SCHEMAS` of
drifting_vla/formats/config.py). The schemas stay in the formats layer so that a run's or a saved
policy's config is checked without importing any network; the call that writes them lives here,
beside the builders, so a plugin's encoder (plugins=[my_package.robot]) cannot gain one half
without the other. The built-in encoders' schemas are declared with every other schema in
formats/config.py, so that a config is checked in full whether or not this package was imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from omegaconf import OmegaConf
from torch import nn

from drifting_vla.formats.config import LANGUAGE_SCHEMAS, VISION_SCHEMAS, EncoderConfig
from drifting_vla.formats.settings import check_schema, over_defaults, plain

VISION_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
"""model.vision.name -> backbone class. A backbone maps uint8 [N, 3, H, W] to [N, num_tokens, out_dim]."""

LANGUAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {}
"""model.language.name -> encoder class; each maps list[str] to (tokens [B, L, D], mask [B, L], pooled [B, D])."""


def register_vision_encoder(name: str, schema: type[EncoderConfig] | None = None):
    """Register a backbone class under `model.vision.name` = `name`: it is built with the keys of
    `model.vision` other than `name`, and must set `out_dim` (D). `schema`, a subclass of
    `EncoderConfig` declaring those keys with `setting()`, checks `model.vision` when a run starts
    or a policy loads; without one only `name` is checked and the class refuses what it lacks."""
    return _registration("vision", VISION_BACKBONES, VISION_SCHEMAS, name, schema)


def register_language_encoder(name: str, schema: type[EncoderConfig] | None = None):
    """Register an encoder class under `model.language.name` = `name`, built with the keys of
    `model.language` other than `name` and setting `out_dim` (D); `schema` as for
    `register_vision_encoder`."""
    return _registration("language", LANGUAGE_ENCODERS, LANGUAGE_SCHEMAS, name, schema)


def build_encoder(part: str, cfg, **context) -> nn.Module:
    """The encoder `model.<part>` names, built with its keys merged over its schema's defaults (so
    the schema, not the class, says what an omitted key means) and, from `context`, what the run
    knows and the config does not (`pretrained`, the data's `instructions`), each given only to a
    class whose constructor takes it and whose config left it unset (absent, null or an empty list:
    an explicit value, `false` included, wins)."""
    builders, schemas = {"vision": (VISION_BACKBONES, VISION_SCHEMAS), "language": (LANGUAGE_ENCODERS, LANGUAGE_SCHEMAS)}[part]
    name = cfg["name"]
    if name not in builders:
        raise ValueError(f"unknown model.{part}.name {name!r}; choose one of {sorted(builders)}")
    keys = plain(cfg)
    if name in schemas:
        keys = OmegaConf.to_container(over_defaults(f"model.{part}", schemas[name], keys), resolve=True)
    keys.pop("name")
    takes = inspect.signature(builders[name]).parameters
    keys.update({key: value for key, value in context.items() if key in takes and keys.get(key) in (None, [])})
    return builders[name](**keys)


def _registration(part: str, builders: dict, schemas: dict, name: str, schema: type | None):
    check_schema(schema, EncoderConfig, f"register_{part}_encoder({name!r}, schema={schema!r})")

    def wrap(builder):
        builders[name] = builder
        if schema is not None:  # the built-in encoders' schemas are declared in formats/config.py
            schemas[name] = schema
        return builder

    return wrap
