"""Every Triton kernel compiles for sm_90 at the benchmark configs' shapes, within a block's shared
memory, and the column-tiled forward kernels do not spill (tools/triton_resources.py).

The CPU tests run the kernels through the interpreter, which never compiles them: without this
test a kernel that fails to compile for a GPU, or asks for more shared memory than a block may
have, would pass every CPU test. Compiling needs no GPU (Triton's wheel ships ptxas); it runs in a
subprocess because this process interprets Triton (conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "triton_resources.py"
_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

pytestmark = pytest.mark.skipif(not _PTXAS.exists(), reason="Triton without its CUDA backend")


def _run(tmp_path, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(TOOL), *args, "--json", str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    print(r.stdout[-6000:], r.stderr[-3000:])
    rows = json.loads(out.read_text())["rows"]
    bad = [(x["kernel"], x["error"]) for x in rows if x["error"]]
    assert r.returncode == 0 and not bad, bad
    return rows


@pytest.mark.parametrize("config,dtype", [("paper", "bf16"), ("large", "fp32")])
def test_every_kernel_compiles(tmp_path, config, dtype):
    """The fused and tiled forwards (with and without saving, dropout on and off) and the backward
    sweep, LSTM: all compile, within 227 KB of shared memory. (Before the state-row products were
    chunked, the fused cell kernel asked for 263 KB at `large` in float32: every launch would
    have failed, benchmarks/results/triton-resources-sm90-32de77e.md.)"""
    rows = _run(tmp_path, "--configs", config, "--dtypes", dtype, "--cells", "lstm")
    names = {x["kernel"] for x in rows}
    assert {"_rim_cell_fwd_kernel", "_rim_comm_fwd_kernel", "_rim_query_fwd_kernel",
            "_rim_gates_fwd_kernel", "_rim_comm_qkv_fwd_kernel", "_rim_comm_bwd_kernel",
            "_rim_cell_bwd_kernel"} <= names, names


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_tiled_kernels_do_not_spill(tmp_path, dtype):
    """The column-tiled forward at `paper` and `large`: no register spills (stack 0), the property
    its tile sizes were chosen for."""
    rows = _run(tmp_path, "--configs", "paper,large", "--dtypes", dtype, "--cells", "lstm",
                "--kernels", "_rim_query_fwd,_rim_gates_fwd,_rim_comm_qkv_fwd")
    assert len(rows) >= 6
    spills = [(x["config"], x["kernel"], x["stack"]) for x in rows if x["stack"]]
    assert not spills, spills
