"""The plugin's tests run in an environment with lerobot 0.4.4 installed (docs/lerobot.md); in
drifting-vla's own test environment, which has no lerobot, they skip (importorskip).

Where no real torchvision imports, `torchvision_standin/` goes on the path before LeRobot is
imported: LeRobot 0.4.4 imports torchvision at module level and decodes video ("pyav" backend)
through torchvision's reader (see torchvision_standin/torchvision/__init__.py)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

STANDIN = Path(__file__).parent / "torchvision_standin"


def _real_torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


USES_STANDIN = not _real_torchvision_imports()
if USES_STANDIN:
    sys.path.insert(0, str(STANDIN))
    sys.modules.pop("torchvision", None)


@pytest.fixture
def standin_env() -> dict:
    """The environment for a LeRobot subprocess: the same stand-in on its path."""
    env = dict(os.environ)
    if USES_STANDIN:
        env["PYTHONPATH"] = os.pathsep.join([str(STANDIN), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
