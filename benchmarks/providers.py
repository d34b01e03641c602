"""Providers: each builds, from one config, a callable ``run(x) -> (out, h_n, c_n, masks)``.

- ``torch``: ``rims_fast.RIM(backend="torch")``, the reference (:func:`rims_fast.rim_ref`), eager.
- ``torch_compile``: the same reference module under ``torch.compile`` (the T-step loop unrolls,
  so compile time grows with T and every new shape recompiles).
- ``triton``, ``cuda``, ``cpu``: ``rims_fast.RIM(backend=...)``; skipped with the reason from
  :func:`rims_fast.available_backends` when that backend cannot run here. ``cuda`` is the
  default per-layer choice (``RIMS_FAST_CUDA_FWD=auto``: ``cuda_seq`` or ``cuda_steps`` below);
  results before 2026-11-27's commits name the reference loop with the fused cell ``cuda``.
- ``cuda_cell``: ``cuda`` with ``RIMS_FAST_CUDA_FWD=cell``: the reference loop with the fused CUDA
  masked-cell kernels.
- ``triton_graph``: ``rims_fast.RIM(backend="triton")`` with ``RIMS_FAST_TRITON_GRAPH=1``: the
  no-grad forward replays a captured CUDA graph (fwd+bwd runs as ``triton``).
- ``triton_tiled``, ``triton_tiled_graph``: the same two with ``RIMS_FAST_TRITON_FWD=tiled``: the
  column-tiled forward (four kernels per step, the gate products over batch tile x mechanism x
  unit tile), meant for wide layers (``large``).
- ``triton_kbwd``, ``triton_tiled_graph_kbwd``: ``triton`` and ``triton_tiled_graph`` with
  ``RIMS_FAST_TRITON_BWD=kernels``: the backward as the Triton reverse-time sweep from the
  forward's saved tensors instead of the reference's recompute (fwd rows equal their base's).
- ``cuda_seq``: ``rims_fast.RIM(backend="cuda")`` with ``RIMS_FAST_CUDA_FWD=persistent``: the
  persistent whole-sequence kernels (``rims_fast::rim_seq_fwd`` / ``rim_seq_bwd``).
- ``cuda_seq_f``: ``cuda_seq`` with ``RIMS_FAST_CUDA_XW=0``: the forward reads the input term's
  matrix ``F`` every step instead of the hoisted ``x F`` (``cuda_seq``'s automatic choice where a
  tile reads fewer rows of ``x F`` than of ``F``, as at ``paper``; the ratio is what hoisting buys).
- ``cuda_seq_narrow``: ``cuda_seq`` with ``RIMS_FAST_CUDA_WIDE=0``: at tile 1 the 256-thread
  kernels compiled for tiles up to 8 instead of the 512-thread tile-1 kernels (the ratio is what
  the wider blocks buy; same results bit for bit).
- ``cuda_seq_t2``, ``cuda_seq_t2_narrow``: ``cuda_seq`` and ``cuda_seq_narrow`` with
  ``RIMS_FAST_CUDA_TILE=2``: two samples per block, so each weight is read from L2 once per two
  samples (at ``paper`` the tile-1 forward is bound by those reads) at twice the work per block;
  the forward runs the 512-thread tile-2 kernel, the backward the 256-thread one in both.
- ``cuda_seq_mma``: ``cuda_seq`` with ``RIMS_FAST_CUDA_MMA=1``: both kernels' weight products on
  tensor cores (float16/bfloat16; in float32 it runs as ``cuda_seq``).
- ``cuda_seq_cluster``: ``cuda_seq`` with ``RIMS_FAST_CUDA_CLUSTER=1``: the forward on
  thread-block clusters (sm_90+, one block per mechanism, DSMEM exchange; CUDA cores), each
  block's weights in its shared memory as far as they fit.
- ``cuda_seq_cluster_l2``: ``cuda_seq_cluster`` with ``RIMS_FAST_CUDA_RESIDENT=0``: every weight
  read from L2 each step (what residency buys is the ratio of the two).
- ``cuda_seq_cluster2``: ``cuda_seq_cluster`` with ``RIMS_FAST_CUDA_CLUSTER_BLOCKS=2``: clusters
  of two blocks of ceil(K / 2) mechanisms. At `paper` on an H100 both fill the GPU (one block
  per mechanism: 22 clusters of 6 blocks at tile 3; two blocks: 64 clusters of 2 at tile 1, 128
  blocks); the ratio weighs the 6-block cluster barriers and 3-sample tiles against weights
  that fit a block's shared memory less (3 mechanisms' weights per block instead of 1). At tile 1
  a cluster's blocks are 512-thread blocks compiled for that tile (``RIMS_FAST_CUDA_WIDE``).
- ``cuda_seq_cluster2_narrow``: ``cuda_seq_cluster2`` with ``RIMS_FAST_CUDA_WIDE=0``: the
  256-thread cluster kernel compiled for tiles up to 8 (what ``cuda_seq_cluster2`` ran until
  the wide cluster kernels; the ratio is what they buy, same results bit for bit).
- ``cuda_steps``: ``rims_fast.RIM(backend="cuda")`` with ``RIMS_FAST_CUDA_FWD=stepped``: the
  stepped ops (``rims_fast::rim_steps_fwd`` / ``rim_steps_bwd``: per step four batched GEMMs on
  cuBLAS (five in the GRU forward) and four small kernels each way, launched from C++).
- ``cuda_steps_graph``: ``cuda_steps`` with ``RIMS_FAST_CUDA_GRAPH=1``: the no-grad forward
  replays a captured CUDA graph (fwd+bwd runs as ``cuda_steps``).
- ``cuda_steps_pdl``, ``cuda_steps_graph_pdl``: ``cuda_steps`` and ``cuda_steps_graph`` with
  ``RIMS_FAST_CUDA_PDL=1``: the phase kernels launched with programmatic dependent launch
  (sm_90+), each scheduled while the GEMM before it drains.
- ``cuda_steps_fused``, ``cuda_steps_graph_fused``: ``cuda_steps`` and ``cuda_steps_graph`` with
  ``RIMS_FAST_CUDA_FUSED=1``: the gate product with the LSTM cell and the output product with the
  residual as tensor-core kernels (two launches per step fewer).
- ``cuda_seq_mma_graph``: ``cuda_seq_mma`` with ``RIMS_FAST_CUDA_GRAPH=1`` (one launch per call
  already: the graph takes the hoisted products' launches off the host).
- ``lstm``: ``nn.LSTM(M*D, K*H)`` (cuDNN on GPU), the yardstick: same output width, no gate.
- ``naive``: :class:`benchmarks.naive.NaiveRIM`, unfused code shaped like public RIM code.
- ``brim2``, ``brim2_cpu``, ``brim2_cuda``, ``brim2_triton``, ``brim2_cuda_seq``: a two-layer
  :class:`rims_fast.BRIM` with the config's K, top_k, H in both layers, on the reference
  (``brim2``), the C++ driver one fused layer-step per call (``brim2_cpu``), ``backend="cuda"``
  (``brim2_cuda``: per layer the persistent kernels or the stepped ops), the Triton kernels per
  layer-step (``brim2_triton``) and the persistent CUDA kernels per layer-step
  (``brim2_cuda_seq``): what a stack
  costs next to one layer. It computes another function than the RIM providers, so it has its own
  gate (:func:`benchmarks.harness.gate_brim`: ``brim_ref`` under the provider's masks).

Every RIM provider runs the parameters of one reference module (copied or shared), so outputs can
be compared with the reference's.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import rims_fast

from .configs import BenchConfig
from .naive import NaiveRIM

__all__ = ["PROVIDERS", "RIM_PROVIDERS", "Skip", "Provider", "Context", "build", "make_reference"]

PROVIDERS = ("torch", "torch_compile", "triton", "triton_graph", "triton_tiled",
             "triton_tiled_graph", "triton_kbwd", "triton_tiled_graph_kbwd", "cuda", "cuda_cell",
             "cuda_seq", "cuda_seq_f", "cuda_seq_narrow", "cuda_seq_t2", "cuda_seq_t2_narrow",
             "cuda_seq_mma", "cuda_seq_cluster", "cuda_seq_cluster_l2", "cuda_seq_cluster2",
             "cuda_seq_cluster2_narrow", "cuda_steps",
             "cuda_steps_graph", "cuda_steps_pdl", "cuda_steps_graph_pdl",
             "cuda_steps_fused", "cuda_steps_graph_fused", "cuda_seq_mma_graph", "cpu", "lstm", "naive", "brim2", "brim2_cpu", "brim2_cuda", "brim2_triton", "brim2_cuda_seq")
#: Providers that compute the RIM and so must pass the correctness gate.
RIM_PROVIDERS = ("torch", "torch_compile", "triton", "triton_graph", "triton_tiled",
                 "triton_tiled_graph", "triton_kbwd", "triton_tiled_graph_kbwd", "cuda",
                 "cuda_cell", "cuda_seq", "cuda_seq_f", "cuda_seq_narrow", "cuda_seq_t2",
                 "cuda_seq_t2_narrow", "cuda_seq_mma",
                 "cuda_seq_cluster",
                 "cuda_seq_cluster_l2", "cuda_seq_cluster2", "cuda_seq_cluster2_narrow",
                 "cuda_steps", "cuda_steps_graph", "cuda_steps_pdl", "cuda_steps_graph_pdl",
                 "cuda_steps_fused", "cuda_steps_graph_fused", "cuda_seq_mma_graph", "cpu", "naive")


class Skip(Exception):
    """This provider cannot run here; the message says why."""


@dataclass
class Provider:
    name: str
    run: Callable[[Tensor], tuple]  # x (T, B, M, D) -> (out, h_n, c_n or None, masks or None)
    params: list = field(default_factory=list)  # tensors whose .grad is reset between calls
    is_rim: bool = True
    module: Optional[nn.Module] = None


@dataclass
class Context:
    """What every provider of one config shares."""
    cfg: BenchConfig
    device: torch.device
    dtype: torch.dtype
    reference: nn.Module  # rims_fast.RIM(backend="torch") holding the parameters
    smoke: bool = False
    compile_max_T: int = 100
    allow_compile: bool = True
    compile_skip_reason: str = ""


def make_reference(cfg: BenchConfig, device, dtype, seed: int = 0) -> rims_fast.RIM:
    torch.manual_seed(seed)
    return rims_fast.RIM(cfg.D, cfg.H, cfg.K, cfg.top_k, backend="torch", device=device, dtype=dtype)


def _rim_run(module: nn.Module) -> Callable:
    def run(x: Tensor):
        out, (h_n, c_n), masks = module(x if x.shape[2] > 1 else x.squeeze(2), return_masks=True)
        return out, h_n, c_n, masks
    return run


def _torch(ctx: Context) -> Provider:
    m = ctx.reference
    return Provider("torch", _rim_run(m), list(m.parameters()), module=m)


def _torch_compile(ctx: Context) -> Provider:
    if ctx.smoke:
        raise Skip("torch.compile is skipped on --smoke (compiling the unrolled T-step loop "
                   "takes far longer than the smoke budget)")
    if not ctx.allow_compile:
        raise Skip(ctx.compile_skip_reason)
    if ctx.cfg.T > ctx.compile_max_T:
        raise Skip(f"T={ctx.cfg.T} > --compile-max-T={ctx.compile_max_T}: torch.compile unrolls "
                   "the T-step loop of the reference, so compile time grows with T")
    m = ctx.reference
    try:
        compiled = torch.compile(m)
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        raise Skip(f"torch.compile failed: {type(e).__name__}: {e}") from e
    return Provider("torch_compile", _rim_run(compiled), list(m.parameters()), module=compiled)


@contextlib.contextmanager
def _environ(env: Optional[dict]):
    """Environment variables set for the duration of one call (implementation switches that the
    backends read at call time)."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _backend(name: str, env: Optional[dict] = None, label: Optional[str] = None,
             ) -> Callable[[Context], Provider]:
    """``RIM(backend=name)``; ``env``: environment variables set around each call (they select
    an implementation inside the backend, read at call time)."""
    def build_backend(ctx: Context) -> Provider:
        why = rims_fast.available_backends(ctx.device, ctx.dtype).get(name)
        if why is None and env and env.get("RIMS_FAST_CUDA_FWD") in ("persistent", "stepped"):
            from rims_fast.rim_seq import unavailable_reason
            why = unavailable_reason(ctx.device, ctx.dtype)
        if why is not None:
            raise Skip(why)
        c = ctx.cfg
        m = rims_fast.RIM(c.D, c.H, c.K, c.top_k, backend=name, device=ctx.device, dtype=ctx.dtype)
        m.load_state_dict(ctx.reference.state_dict())
        inner = _rim_run(m)

        def run(x):
            with _environ(env):
                res = inner(x)
            if m.last_backend != name:
                raise RuntimeError(f"asked for backend={name!r} but {m.last_backend!r} ran")
            return res
        return Provider(label or name, run, list(m.parameters()), module=m)
    return build_backend


def _lstm(ctx: Context) -> Provider:
    c = ctx.cfg
    torch.manual_seed(1)
    m = nn.LSTM(c.M * c.D, c.K * c.H, device=ctx.device, dtype=ctx.dtype)
    # The yardstick must run cuDNN's fastest path: the H100 runs of 2026-11-27 (b, c) printed
    # cuDNN's "weights are not part of single contiguous chunk of memory" warning, under which it
    # compacts them on every call. One flatten here (a no-op off CUDA); untested on a GPU yet.
    m.flatten_parameters()

    def run(x: Tensor):
        out, (h_n, c_n) = m(x.flatten(2))
        return out, h_n, c_n, None
    return Provider("lstm", run, list(m.parameters()), is_rim=False, module=m)


def _naive(ctx: Context) -> Provider:
    m = NaiveRIM(ctx.reference)

    def run(x: Tensor):
        out, (h_n, c_n), masks = m(x)
        return out, h_n, c_n, masks
    return Provider("naive", run, list(m.parameters()), module=m)


def _brim2(backend: str, env: Optional[dict] = None, label: Optional[str] = None,
           ) -> Callable[[Context], Provider]:
    name = label or ("brim2" if backend == "torch" else f"brim2_{backend}")

    def build_brim(ctx: Context) -> Provider:
        why = rims_fast.available_backends(ctx.device, ctx.dtype).get(backend)
        if why is None and env and env.get("RIMS_FAST_CUDA_FWD") == "persistent":
            from rims_fast.rim_seq import unavailable_reason
            why = unavailable_reason(ctx.device, ctx.dtype)
        if why is not None:
            raise Skip(why)
        c = ctx.cfg
        torch.manual_seed(2)
        m = rims_fast.BRIM(c.D, c.H, c.K, c.top_k, num_layers=2, backend=backend,
                           device=ctx.device, dtype=ctx.dtype)

        def run(x: Tensor):
            with _environ(env):
                out, states, masks = m(x, return_masks=True)
            return out, states[-1][0], states[-1][1], masks[-1]
        return Provider(name, run, list(m.parameters()), is_rim=False, module=m)
    return build_brim


_BUILDERS: dict[str, Callable[[Context], Provider]] = {
    "torch": _torch, "torch_compile": _torch_compile, "triton": _backend("triton"),
    "cuda": _backend("cuda"), "cpu": _backend("cpu"),
    "cuda_cell": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "cell"}, "cuda_cell"),
    "cuda_seq": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent"}, "cuda_seq"),
    "cuda_seq_f": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent", "RIMS_FAST_CUDA_XW": "0"},
                           "cuda_seq_f"),
    "cuda_seq_narrow": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent",
                                         "RIMS_FAST_CUDA_WIDE": "0"}, "cuda_seq_narrow"),
    "cuda_seq_t2": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent",
                                     "RIMS_FAST_CUDA_TILE": "2"}, "cuda_seq_t2"),
    "cuda_seq_t2_narrow": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent",
                                            "RIMS_FAST_CUDA_TILE": "2", "RIMS_FAST_CUDA_WIDE": "0"},
                                   "cuda_seq_t2_narrow"),
    "cuda_seq_mma": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent", "RIMS_FAST_CUDA_MMA": "1"},
                             "cuda_seq_mma"),
    "cuda_seq_cluster": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent",
                                          "RIMS_FAST_CUDA_CLUSTER": "1"}, "cuda_seq_cluster"),
    "cuda_seq_cluster_l2": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent",
                                             "RIMS_FAST_CUDA_CLUSTER": "1",
                                             "RIMS_FAST_CUDA_RESIDENT": "0"}, "cuda_seq_cluster_l2"),
    "cuda_seq_cluster2": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent",
                                           "RIMS_FAST_CUDA_CLUSTER": "1",
                                           "RIMS_FAST_CUDA_CLUSTER_BLOCKS": "2"},
                                  "cuda_seq_cluster2"),
    "cuda_seq_cluster2_narrow": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent",
                                                  "RIMS_FAST_CUDA_CLUSTER": "1",
                                                  "RIMS_FAST_CUDA_CLUSTER_BLOCKS": "2",
                                                  "RIMS_FAST_CUDA_WIDE": "0"},
                                         "cuda_seq_cluster2_narrow"),
    "cuda_steps": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "stepped"}, "cuda_steps"),
    "cuda_steps_graph": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "stepped",
                                          "RIMS_FAST_CUDA_GRAPH": "1"}, "cuda_steps_graph"),
    "cuda_steps_pdl": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "stepped",
                                        "RIMS_FAST_CUDA_PDL": "1"}, "cuda_steps_pdl"),
    "cuda_steps_graph_pdl": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "stepped",
                                              "RIMS_FAST_CUDA_GRAPH": "1",
                                              "RIMS_FAST_CUDA_PDL": "1"}, "cuda_steps_graph_pdl"),
    "cuda_steps_fused": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "stepped",
                                          "RIMS_FAST_CUDA_FUSED": "1"}, "cuda_steps_fused"),
    "cuda_steps_graph_fused": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "stepped",
                                                "RIMS_FAST_CUDA_GRAPH": "1",
                                                "RIMS_FAST_CUDA_FUSED": "1"},
                                       "cuda_steps_graph_fused"),
    "cuda_seq_mma_graph": _backend("cuda", {"RIMS_FAST_CUDA_FWD": "persistent",
                                            "RIMS_FAST_CUDA_MMA": "1",
                                            "RIMS_FAST_CUDA_GRAPH": "1"}, "cuda_seq_mma_graph"),
    "triton_graph": _backend("triton", {"RIMS_FAST_TRITON_GRAPH": "1"}, "triton_graph"),
    "triton_tiled": _backend("triton", {"RIMS_FAST_TRITON_FWD": "tiled"}, "triton_tiled"),
    "triton_tiled_graph": _backend("triton", {"RIMS_FAST_TRITON_FWD": "tiled",
                                              "RIMS_FAST_TRITON_GRAPH": "1"}, "triton_tiled_graph"),
    "triton_kbwd": _backend("triton", {"RIMS_FAST_TRITON_BWD": "kernels"}, "triton_kbwd"),
    "triton_tiled_graph_kbwd": _backend("triton", {"RIMS_FAST_TRITON_FWD": "tiled",
                                                   "RIMS_FAST_TRITON_GRAPH": "1",
                                                   "RIMS_FAST_TRITON_BWD": "kernels"},
                                        "triton_tiled_graph_kbwd"),
    "lstm": _lstm, "naive": _naive,
    "brim2": _brim2("torch"), "brim2_cpu": _brim2("cpu"), "brim2_cuda": _brim2("cuda"),
    "brim2_triton": _brim2("triton"),
    "brim2_cuda_seq": _brim2("cuda", {"RIMS_FAST_CUDA_FWD": "persistent"}, "brim2_cuda_seq"),
}


def build(name: str, ctx: Context) -> Provider:
    """The provider ``name`` for this config; raises :class:`Skip` with the reason if it cannot
    run here."""
    return _BUILDERS[name](ctx)
