"""Serve a checkpoint over the network: websocket + msgpack, concurrent clients batched.

    python scripts/serve.py checkpoint=runs/2026-01-01_12-00-00                  # ws://127.0.0.1:8000
    DRIFTING_VLA_SERVE_TOKEN=secret python scripts/serve.py checkpoint=<dir> host=0.0.0.0 port=8000

Prints "ready: ws://HOST:PORT" once it accepts connections; SIGTERM (or Ctrl-C) answers every
queued request, closes the connections and exits 0. Keys: drifting_vla/configs/serve.yaml; protocol and load
figures: docs/serving.md. Clients: `from drifting_vla.serving import PolicyClient`.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drifting_vla.inference.policy import DriftingPolicy  # noqa: E402
from drifting_vla.plugins import load_plugins  # noqa: E402
from drifting_vla.serving.server import ServerConfig, serve_forever  # noqa: E402
from drifting_vla.serving.startup import StartupError, check_listen_address, resolve_device  # noqa: E402
from drifting_vla.training.config import validate_serve_config  # noqa: E402

log = logging.getLogger("serve")


@hydra.main(config_path="../drifting_vla/configs", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # until the server's own handlers take over
        signal.signal(sig, _stop_starting)
    try:
        serve(cfg)
    except _StoppedStarting as stopped:
        log.info("stopped by %s during start-up, before serving", stopped)
    except StartupError as error:  # a key to change, not a bug: no traceback
        print(f"serve.py: {error}", file=sys.stderr)
        raise SystemExit(2) from None


class _StoppedStarting(Exception):
    """SIGTERM or SIGINT while the model loads: end without a traceback, exit 0."""


def _stop_starting(signum, _frame) -> None:
    raise _StoppedStarting(signal.Signals(signum).name)


def serve(cfg: DictConfig) -> None:
    validate_serve_config(cfg)
    device = resolve_device(str(cfg.device))  # what can fail on this machine, before the model loads
    check_listen_address(str(cfg.host), int(cfg.port))
    load_plugins(cfg.plugins)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    policy = DriftingPolicy.from_checkpoint(cfg.checkpoint, device=device, nfe=cfg.nfe, sampler=cfg.sampler)
    if hasattr(policy.model.language_encoder, "cache_size"):  # a frozen text encoder (not task embeddings)
        policy.model.language_encoder.cache_size = int(cfg.instruction_cache)
    token = str(cfg.token) if cfg.token else None
    if token is None and not _is_loopback(str(cfg.host)):
        log.warning("serving on %s without a token: anyone who reaches this port can drive the policy; "
                    "set DRIFTING_VLA_SERVE_TOKEN", cfg.host)
    config = ServerConfig(
        host=str(cfg.host),
        port=int(cfg.port),
        token=token,
        max_batch=int(cfg.max_batch),
        max_wait_ms=float(cfg.max_wait_ms),
        max_queue=int(cfg.max_queue),
        max_message_bytes=int(float(cfg.max_message_mb) * 2**20),
        max_instruction_chars=int(cfg.max_instruction_chars),
        max_image_pixels=int(cfg.max_image_pixels),
        control_hz=None if cfg.control_hz is None else float(cfg.control_hz),
    )
    log.info("checkpoint %s on %s", policy.checkpoint, device)
    server = serve_forever(policy, config)
    log.info("drained: %d requests served", server.requests_served)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    main()
