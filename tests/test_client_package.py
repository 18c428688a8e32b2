"""The robot-side package `drifting-vla-client` (clients/python): installs and round-trips without
torch, and is the framework's own client code, not a copy. The server's health check."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.exceptions import InvalidStatus

from drifting_vla.serving import PolicyClient, server_health
from tests import test_serving
from tests.helpers import observation, served_policy

running = test_serving.running  # the fixture: a PolicyServer in a thread, stopped after the test

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clients" / "python"

ROUND_TRIP = """
import sys
import numpy as np
from drifting_vla_client import PolicyClient, server_health
url, seed = sys.argv[1], int(sys.argv[2])
health = server_health(url)
assert health["ready"] is True, health
rng = np.random.default_rng(7)
obs = {"images": rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8),
       "proprio": np.array([0.1, -0.2, 0.3, 0.0], dtype=np.float32), "instruction": sys.argv[3]}
with PolicyClient(url) as client:
    chunk = client.predict(obs, seed=seed)
np.save(sys.argv[4], chunk)
heavy = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in {"torch", "drifting_vla", "transformers"})
assert not heavy, heavy
"""


def expected_chunk(policy, seed: int) -> np.ndarray:
    obs = observation(level=7)
    return policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(seed))


def test_client_package_modules_are_the_frameworks_files_not_copies():
    linked = sorted(p for p in (PACKAGE / "drifting_vla_client").rglob("*.py") if p.is_symlink())
    targets = {p.relative_to(PACKAGE / "drifting_vla_client").as_posix(): p.resolve().relative_to(ROOT).as_posix() for p in linked}
    assert targets == {
        "inference/history.py": "drifting_vla/inference/history.py",
        "safety.py": "drifting_vla/safety.py",
        "serving/__init__.py": "drifting_vla/serving/__init__.py",
        "serving/client.py": "drifting_vla/serving/client.py",
        "serving/execution.py": "drifting_vla/serving/execution.py",
        "serving/protocol.py": "drifting_vla/serving/protocol.py",
        "specs.py": "drifting_vla/specs.py",
    }


def test_client_package_round_trips_with_torch_and_drifting_vla_blocked(running, tmp_path):
    """The package from its source directory, in a process where importing torch or drifting_vla fails."""
    policy = served_policy()
    server = running(policy)
    blocked = "import sys; sys.modules['torch'] = sys.modules['drifting_vla'] = None; sys.path.insert(0, sys.argv.pop(1))\n"
    out = tmp_path / "chunk.npy"
    subprocess.run([sys.executable, "-c", blocked + ROUND_TRIP, str(PACKAGE), server.url, "5", observation()["instruction"], str(out)],
                   check=True, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    np.testing.assert_array_equal(np.load(out), expected_chunk(policy, 5))


@pytest.mark.slow
def test_client_package_installs_into_a_fresh_venv_without_torch_and_round_trips(running, tmp_path):
    """`python -m venv` + `pip install clients/python` (numpy, msgpack, websockets from the package
    index; DRIFTING_VLA_WHEELHOUSE=DIR installs offline from wheels there)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    wheelhouse = os.environ.get("DRIFTING_VLA_WHEELHOUSE")
    offline = ["--no-index", "--find-links", wheelhouse] if wheelhouse else []
    subprocess.run([str(python), "-m", "pip", "install", "-q", *offline, str(PACKAGE)], check=True, timeout=600)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "drifting-vla-client" in installed and not installed & {"torch", "drifting-vla", "transformers"}
    policy = served_policy()
    server = running(policy)
    out = tmp_path / "chunk.npy"
    subprocess.run([str(python), "-c", ROUND_TRIP, server.url, "5", observation()["instruction"], str(out)],
                   check=True, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    np.testing.assert_array_equal(np.load(out), expected_chunk(policy, 5))


# ----------------------------------------------------------------------------------------------
# Health check


def test_health_check_answers_http_get_with_ready_and_the_model(running):
    server = running()
    with urllib.request.urlopen(server.url.replace("ws://", "http://") + "/healthz", timeout=10) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
        body = json.loads(reply.read())
    assert body == {"ready": True, "protocol": "drifting-vla/1", "model": "tiny", "method": "drifting nfe=1"}
    assert server_health(server.url) == body


def test_health_check_needs_no_token_while_the_websocket_still_does(running):
    server = running(token="s3cret")
    assert server_health(server.url)["ready"] is True
    with pytest.raises(InvalidStatus, match="401"):
        PolicyClient(server.url)
    with PolicyClient(server.url, token="s3cret") as client:
        assert client.predict(observation()).shape == (4, 4)


def test_health_check_of_a_stopped_server_fails_to_connect(running):
    server = running()
    url = server.url
    server.stop()
    with pytest.raises(urllib.error.URLError):
        server_health(url, timeout_s=2)
