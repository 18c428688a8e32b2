"""The user's own modules, named on the command line, that extend the registries.

    python scripts/simulate_eval.py checkpoint=runs/x plugins=[my_package.robot]
    python scripts/train.py plugins=[my_package.robot] data=my_robot

Importing `my_package.robot` runs its registrations, one call per thing it adds:
`drifting_vla.envs.register_env`, `drifting_vla.data.registry.register_dataset(name, schema=...)`,
`drifting_vla.models.register_vision_encoder(name, schema=...)` and `register_language_encoder`,
an entry in `drifting_vla.objectives.OBJECTIVES`. A `schema` (a dataclass of `setting()`s, like
those of drifting_vla/formats/config.py) declares the thing's own config keys, checked when a run
starts or a saved policy loads, naming a wrong one. This is
the one way a script imports code it was not written with, and it is an act of the user: the
scripts take `plugins` from their own command line and config files, never from a checkpoint, an
export or a server. A run's config.yaml records the plugins it was
trained with, for a person to read; loading the run imports none of them.

Spawned simulator workers need no plugins: the parent resolves a registered name to its
`module:Class` import path and hands the worker that.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


def load_plugins(modules: Iterable[str] | None) -> None:
    """Import each module named in `modules` (dotted names, e.g. `my_package.robot`)."""
    if isinstance(modules, str):
        raise ValueError(f"plugins must be a list of module names, e.g. plugins=[{modules}], got the string {modules!r}")
    for name in modules or ():
        try:
            importlib.import_module(str(name))
        except ImportError as error:
            raise ImportError(f"plugins: cannot import {name!r} ({error}); is its package installed or on PYTHONPATH?") from error
