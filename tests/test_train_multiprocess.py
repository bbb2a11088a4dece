"""Two local processes joined by jax.distributed (2 CPU devices each) train like one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train_helpers import SyntheticIterator, tiny_config

from jax_refine import sharding as shd, train

pytestmark = pytest.mark.slow  # two jax.distributed processes: not in the fast tier

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    steps, port = 3, _free_port()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    work = tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, str(HERE / "train_driver.py"), str(work), "--steps", str(steps),
                               "--devices", "2", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--mesh", "2,2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    result = json.loads([x for x in outs[0][0].splitlines() if x.startswith("RESULT ")][-1][7:])
    assert not any(x.startswith("RESULT ") for x in outs[1][0].splitlines())  # only process 0 reports
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]

    config = tiny_config(tmp_path / "single", **{"train.num_steps": steps, "checkpoint.every_steps": 2})
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
    train.train(config, data_iter=SyntheticIterator(8), mesh=mesh)
    single = [json.loads(line)["loss"] for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(result["losses"]) == steps
    np.testing.assert_allclose(result["losses"], single, rtol=0, atol=1e-5)
