"""The base config as a config of its own: `--config default[:PRESET]`, e.g. with
`--config.train.batch_size=256`. Its keys and comments live in jax_refine/config_base.py."""
from jax_refine.config_base import get_config  # noqa: F401  (the loader calls get_config(ARG))
