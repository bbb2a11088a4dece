"""What XLA says about a compiled step: its memory analysis and its cost-analysis FLOPs."""
from __future__ import annotations

import logging
from typing import Any

from jax_refine.console import log as console

log = logging.getLogger(__name__)
_BYTES = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes")


def describe_compiled(compiled: Any, batch_size: int) -> dict[str, float]:
    """Print the compiled step's memory analysis (per device) and FLOPs; returns the numbers (bytes, ``flops``)."""
    info: dict[str, float] = {}
    try:
        mem = compiled.memory_analysis()
        info.update({name: float(getattr(mem, name)) for name in _BYTES if hasattr(mem, name)})
    except (NotImplementedError, RuntimeError, AttributeError) as e:  # not every backend implements it
        log.warning("memory_analysis unavailable: %s", e)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["flops"] = float(cost.get("flops", float("nan")))
    except (NotImplementedError, RuntimeError, AttributeError, TypeError) as e:
        log.warning("cost_analysis unavailable: %s", e)
    gib = 2.0**30
    parts = [f"{k.replace('_size_in_bytes', '')}={v / gib:.3f}GiB" for k, v in info.items() if "bytes" in k]
    flops = info.get("flops", float("nan"))
    console.info("compiled step (per device): %s; flops=%.3e (%.3e/example)", " ".join(parts), flops,
                 flops / batch_size)
    return info
