"""Model families, one folder each: an NNX module (`modeling.py`), its checkpoint name map and load/save
(`params.py`) and, where the family has its own, a tokenizer; `interface.py` (what every model provides,
and a family's record) and `registry.py` (which family a checkpoint is)."""
