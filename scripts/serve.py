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
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drifting_vla.inference.policy import DriftingPolicy  # noqa: E402
from drifting_vla.onnx_policy import OnnxPolicy  # noqa: E402
from drifting_vla.plugins import load_plugins  # noqa: E402
from drifting_vla.serving.server import ServerConfig, serve_forever  # noqa: E402
from drifting_vla.training.config import validate_serve_config  # noqa: E402

log = logging.getLogger("serve")


@hydra.main(config_path="../drifting_vla/configs", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    validate_serve_config(cfg)
    load_plugins(cfg.plugins)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else str(cfg.device)
    policy = _load_policy(cfg, device)
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
        control_hz=None if cfg.control_hz is None else float(cfg.control_hz),
    )
    log.info("checkpoint %s on %s", policy.checkpoint, device)
    server = serve_forever(policy, config)
    log.info("drained: %d requests served", server.requests_served)


def _load_policy(cfg: DictConfig, device: str):
    """A checkpoint, run or export directory as a DriftingPolicy; a `.onnx` file (scripts/export_onnx.py)
    as an OnnxPolicy run by ONNX Runtime, whose sampling was fixed at export."""
    if not str(cfg.checkpoint).endswith(".onnx"):
        return DriftingPolicy.from_checkpoint(cfg.checkpoint, device=device, nfe=cfg.nfe, sampler=cfg.sampler)
    if cfg.nfe is not None or cfg.sampler is not None:
        raise SystemExit(f"{cfg.checkpoint}: an ONNX policy samples as it was exported (nfe and sampler are in its graph); "
                         "drop nfe= and sampler=, or export again with them (scripts/export_onnx.py)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
    threads = int(cfg.num_threads) if cfg.num_threads else None
    return OnnxPolicy.from_file(cfg.checkpoint, threads=threads, providers=providers)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    main()
