"""CUDA-graph replay of ``backend="cuda"``'s sequence ops (opt-in, ``RIMS_FAST_CUDA_GRAPH=1``).

A forward that saves nothing (no input requires grad) and draws no dropout is captured once per
(shapes, dtypes, config, kernel options, parameter storage) — the hoisted PyTorch products and
the op, the same code as the eager call — and replayed: ``x`` and the initial state are copied
into the graph's static buffers, the outputs copied out. Parameters are read in place, so
in-place optimizer updates are seen by later replays; a parameter that gets new storage (or a
new shape) makes a new capture. It was written for the stepped forward, which issues 8 launches
per step from C++; on an H100 replay gained only 3-5% there (87.5 -> 82.9 ms at `large`, bf16:
its kernels, not its launches, took the time) and 2% on the persistent forward, one launch per
call (benchmarks/results/nvidia-h100-*-2026-11-27a.json).
"""

from __future__ import annotations

import collections
import os
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["graph_mode", "replay"]


def graph_mode() -> bool:
    """``RIMS_FAST_CUDA_GRAPH``: ``1`` replays captured CUDA graphs of ``backend="cuda"``'s
    no-grad, dropout-free forward (persistent kernels or stepped ops, but not
    ``RIMS_FAST_CUDA_FWD=cell``); ``0`` (default) launches eagerly."""
    v = os.environ.get("RIMS_FAST_CUDA_GRAPH", "0")
    if v not in ("0", "1"):
        raise ValueError(f"RIMS_FAST_CUDA_GRAPH must be 0 or 1, got {v!r}")
    return v == "1"


Run = Callable[[Tensor, Tensor, Optional[Tensor]], tuple]


class _Captured:
    """One captured call. It holds its static inputs and outputs, and keeps ``keep`` (the
    parameters) alive: a CUDA graph keeps no reference to the memory its kernels read, so a freed
    parameter would be read after reuse by later replays."""

    def __init__(self, run: Run, x: Tensor, h0: Tensor, c0: Optional[Tensor], keep: tuple):
        self.keep = keep
        self.x, self.h0 = torch.empty_like(x), torch.empty_like(h0)
        self.c0 = torch.empty_like(c0) if c0 is not None else None
        self.fill(x, h0, c0)
        dev = x.device
        side = torch.cuda.Stream(device=dev)  # warm-up outside capture: cuBLAS handles, workspaces
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            run(self.x, self.h0, self.c0)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = run(self.x, self.h0, self.c0)

    def fill(self, x: Tensor, h0: Tensor, c0: Optional[Tensor]) -> None:
        self.x.copy_(x)
        self.h0.copy_(h0)
        if c0 is not None:
            self.c0.copy_(c0)


_GRAPHS: "collections.OrderedDict[tuple, _Captured]" = collections.OrderedDict()
_GRAPHS_MAX = 8  # captured calls kept (each holds its buffers); least recently used out


def replay(key: tuple, run: Run, x: Tensor, h0: Tensor, c0: Optional[Tensor],
           params: dict) -> tuple:
    """``run(x, h0, c0)``'s outputs (tensors or None), from the graph captured for ``key`` (made
    on first use). ``key`` must pin everything ``run`` depends on besides ``x``, ``h0``, ``c0``;
    added here: the parameters' storage, shapes and dtypes, the input shapes, the TF32 setting
    (the captured float32 GEMMs keep that of capture time), inference mode (whose static
    buffers later plain calls could not fill) and the current stream (each stream its own
    buffers: replays on two streams must not share them). Capture and replay run on ``x``'s
    device, whichever is current."""
    from ._backend import tf32_matmul
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device)
        key = (key, tuple(x.shape), x.dtype, x.device, c0 is not None, tf32_matmul(),
               torch.is_inference_mode_enabled(), stream.cuda_stream,
               tuple((n, t.data_ptr(), tuple(t.shape), t.dtype) for n, t in params.items()))
        cap = _GRAPHS.get(key)
        if cap is None:
            while len(_GRAPHS) >= _GRAPHS_MAX:
                _GRAPHS.popitem(last=False)
            cap = _GRAPHS[key] = _Captured(run, x, h0, c0, tuple(params.values()))
        _GRAPHS.move_to_end(key)
        cap.fill(x, h0, c0)
        cap.graph.replay()
        # Copies: the next replay overwrites the static outputs.
        return tuple(None if t is None else t.clone() for t in cap.outputs)
