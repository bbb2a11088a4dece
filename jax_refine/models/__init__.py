"""Model families, one folder each (module and checkpoint name map)."""
