"""Model families other than the built-in HF CLIP (`jax_refine.model`), one folder each: an NNX module
(`modeling.py`), its checkpoint name map (`params.py`) and, where the family has its own, a tokenizer."""
