"""Model families, one folder each: an NNX module (`modeling.py`), its checkpoint name map and load/save
(`params.py`) and, where the family has its own, a tokenizer; `layers.py` (the blocks every family builds from),
`interface.py` (what every model provides, and a family's record) and `registry.py` (the list of families:
which family a checkpoint is, `load` / `save` of any family, a model's `preprocessing`)."""
