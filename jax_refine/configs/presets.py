"""Mesh presets, chosen with `--config default:PRESET` (demo, study too) or `--config clip_refine:mesh=PRESET`.

| preset   | devices                         | mesh (data x fsdp x tensor) | notes                                  |
|----------|---------------------------------|-----------------------------|----------------------------------------|
| cpu      | this machine's CPU              | all x 1 x 1                 | default; also the tests' fake devices  |
| gpu1     | one CUDA GPU                    | 1 x 1 x 1                   |                                        |
| gpu8     | one host with 8 GPUs            | 1 x 8 x 1                   | FSDP over NVLink                       |
| tpu_pod  | a TPU pod slice, all hosts      | all/4 x 4 x 1               | FSDP inside groups of 4 chips          |

Presets keep the paper's fp32 compute; add `--config.model.dtype=bfloat16` for speed on GPUs/TPUs.
"""
from __future__ import annotations

import ml_collections

MESH_PRESETS = {
    "cpu": {"data": -1, "fsdp": 1, "tensor": 1},
    "gpu1": {"data": 1, "fsdp": 1, "tensor": 1},
    "gpu8": {"data": 1, "fsdp": 8, "tensor": 1},
    "tpu_pod": {"data": -1, "fsdp": 4, "tensor": 1},
}


def apply_preset(config: ml_collections.ConfigDict, preset: str | None) -> ml_collections.ConfigDict:
    """Set `config.mesh.shape` from a named preset (None or "" keeps it)."""
    if not preset:
        return config
    if preset not in MESH_PRESETS:
        raise ValueError(f"unknown mesh preset {preset!r}; choose one of {sorted(MESH_PRESETS)}")
    config.mesh.shape = ml_collections.ConfigDict(MESH_PRESETS[preset])
    return config
