"""A tiny CLIP-Refine config for the trainer tests: random-init tiny CLIP, batch 8, a few steps, CPU."""
from __future__ import annotations

import copy

import ml_collections

from jax_refine import config_base

TINY_CLIP = dict(
    text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=77),
    vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
    projection_dim=24,
)


def get_config() -> ml_collections.ConfigDict:
    c = config_base.get_config()
    c.workdir = "/tmp/jax_refine_tiny_test"
    c.model.random_init = copy.deepcopy(TINY_CLIP)
    c.train.batch_size = 8
    c.train.num_steps = 4
    c.train.export_hf = False
    c.optimizer.lr = 1e-3
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.checkpoint.every_steps = 2
    c.checkpoint.max_to_keep = 2
    c.log.every_steps = 1
    c.log.tensorboard = False
    return c
