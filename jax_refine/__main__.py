"""`python -m jax_refine`: see jax_refine/cli.py."""
import sys

from jax_refine.cli import main

sys.exit(main())
