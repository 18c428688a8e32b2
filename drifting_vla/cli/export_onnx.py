"""Export a policy's observation-to-chunk path as one ONNX graph (ONNX Runtime, TensorRT, edge devices).

    python scripts/export_onnx.py checkpoint=runs/2026-01-01_12-00-00 output=policy.onnx
    python scripts/export_onnx.py checkpoint=exports/drawer output=drawer.onnx instructions=["open the drawer please"]
    python scripts/export_onnx.py checkpoint=runs/flow output=flow.onnx nfe=5       # the loop unrolled at 5 steps

Writes `output` (graph + metadata in one file; docs/export.md), then, with `verify=true`, runs it
once in ONNX Runtime on a random observation beside the PyTorch policy, given the same noise, and
prints the largest difference in raw action units. Run the file with
`drifting_vla.inference.onnx_policy.OnnxPolicy` (no torch) or serve it: `scripts/serve.py checkpoint=policy.onnx`.
Keys: drifting_vla/configs/export_onnx.yaml.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from drifting_vla.formats.validation import validate_export_onnx_config
from drifting_vla.inference.onnx_export import verify_export
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.plugins import load_plugins

log = logging.getLogger("export_onnx")


@hydra.main(config_path="../configs", config_name="export_onnx", version_base=None)
def main(cfg: DictConfig) -> None:
    config = validate_export_onnx_config(cfg)
    load_plugins(config.plugins)
    policy = DriftingPolicy.from_pretrained(config.checkpoint, nfe=config.nfe, sampler=config.sampler)
    log.info("policy %s: %s", policy.checkpoint, policy.method)
    path = policy.export_onnx(config.output, instructions=config.instructions)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {policy.method}", flush=True)
    if config.verify:
        print(f"verified: max |onnxruntime - pytorch| = {verify_export(policy, path):.2e} (raw action units)", flush=True)


if __name__ == "__main__":
    main()
