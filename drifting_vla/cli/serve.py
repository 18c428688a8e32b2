"""Serve a checkpoint over the network: websocket + msgpack, concurrent clients batched.

    python scripts/serve.py checkpoint=runs/2026-01-01_12-00-00                  # ws://127.0.0.1:8000
    python scripts/serve.py checkpoint=policy.onnx                               # an ONNX export, in ONNX Runtime
    DRIFTING_VLA_SERVE_TOKEN=secret python scripts/serve.py checkpoint=<dir> host=0.0.0.0 port=8000

Prints "ready: ws://HOST:PORT" once it accepts connections (and answers `GET /healthz` with 200); SIGTERM (or Ctrl-C) answers every
queued request, closes the connections and exits 0. Keys: drifting_vla/configs/serve.yaml; protocol and load
figures: docs/serving.md. Clients: `from drifting_vla.serving import PolicyClient`.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys

import hydra
import torch
from omegaconf import DictConfig

from drifting_vla.formats.validation import validate_serve_config
from drifting_vla.inference.onnx_policy import OnnxPolicy
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.plugins import load_plugins
from drifting_vla.serving.server import serve_forever
from drifting_vla.serving.startup import StartupError, check_listen_address, resolve_device

log = logging.getLogger("serve")


@hydra.main(config_path="../configs", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # until the server's own handlers take over
        signal.signal(sig, _stop_starting)
    try:
        serve(cfg)
    except _StoppedStarting as stopped:
        log.info("stopped by %s during start-up, before serving", stopped)
    except StartupError as error:  # a key to change, not a bug: no traceback
        print(f"drifting-serve: {error}", file=sys.stderr)
        raise SystemExit(2) from None


class _StoppedStarting(Exception):
    """SIGTERM or SIGINT while the model loads: end without a traceback, exit 0."""


def _stop_starting(signum, _frame) -> None:
    raise _StoppedStarting(signal.Signals(signum).name)


def serve(cfg: DictConfig) -> None:
    config = validate_serve_config(cfg)  # the server's own settings and what to load
    device = resolve_device(config.device)  # what can fail on this machine, before the model loads
    check_listen_address(config.host, config.port)
    load_plugins(config.plugins)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    policy = _load_policy(config, str(device))
    if hasattr(getattr(policy, "model", None), "language_encoder") and hasattr(policy.model.language_encoder, "cache_size"):
        policy.model.language_encoder.cache_size = config.instruction_cache  # a frozen text encoder, not task embeddings
    if not config.token and not _is_loopback(config.host):
        log.warning("serving on %s without a token: anyone who reaches this port can drive the policy; "
                    "set DRIFTING_VLA_SERVE_TOKEN", config.host)
    log.info("checkpoint %s on %s", policy.checkpoint, device)
    server = serve_forever(policy, config)
    log.info("drained: %d requests served", server.requests_served)


def _load_policy(config, device: str):
    """A checkpoint, run or export directory as a DriftingPolicy; a `.onnx` file (scripts/export_onnx.py)
    as an OnnxPolicy run by ONNX Runtime, whose sampling was fixed at export."""
    if not config.checkpoint.endswith(".onnx"):
        return DriftingPolicy.from_checkpoint(config.checkpoint, device=device, nfe=config.nfe, sampler=config.sampler)
    if config.nfe is not None or config.sampler is not None:
        raise SystemExit(f"{config.checkpoint}: an ONNX policy samples as it was exported (nfe and sampler are in its graph); "
                         "drop nfe= and sampler=, or export again with them (scripts/export_onnx.py)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
    return OnnxPolicy.from_file(config.checkpoint, threads=config.num_threads, providers=providers)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    main()
