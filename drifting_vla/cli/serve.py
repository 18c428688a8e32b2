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

import hydra
import torch
from omegaconf import DictConfig

from drifting_vla.formats.config import validate_serve_config
from drifting_vla.inference.onnx_policy import OnnxPolicy
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.plugins import load_plugins
from drifting_vla.serving.server import serve_forever

log = logging.getLogger("serve")


@hydra.main(config_path="../configs", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    config = validate_serve_config(cfg)  # the server's own settings and what to load
    load_plugins(config.plugins)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    policy = _load_policy(config, device)
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
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
    return OnnxPolicy.from_file(config.checkpoint, threads=config.num_threads, providers=providers)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    main()
