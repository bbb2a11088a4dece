"""jax_refine: CLIP-Refine (Yamaguchi et al., CVPR 2025) in JAX/Flax NNX.

Importing the package is cheap and does not import TensorFlow: `from jax_refine import losses`
is all another JAX project needs for the loss functions.
"""
__version__ = "0.1.0"
