"""The persistent whole-sequence kernels (``rims_fast::rim_seq_fwd`` / ``rim_seq_bwd``, CUDA
C++) as one differentiable sequence op.

:func:`rim_seq` has :func:`rims_fast.reference.rim_ref`'s contract. What runs where:

- **Forward — one CUDA kernel launch for all T steps** (``csrc/kernels/rim_seq_fwd.cuh``): each
  thread block owns a tile of up to 8 samples for the whole sequence, keeps their ``h``/``c`` and
  every per-step activation in shared memory, and runs SPEC steps 1-5 as nine barrier-separated
  phases per step (queries; scores, null softmax and ``p``; the rank rule; the attention-weighted
  input; the gate products of the active rows; the masked cell; communication Q/K/V; the
  communication attention; output projection and residual). Samples never interact, so there is
  no grid synchronisation. Before it, PyTorch hoists the state-independent work: the input keys of
  all steps and either the fold ``input_value_n weight_ih[k]_n`` (when ``M*D <= d_v``, the
  reference's rule; the kernel reads ``x``) or the values of all steps (the kernel reads them and
  multiplies ``weight_ih`` in place); and where it pays (:func:`xw_mode`, CUDA cores) the op
  itself multiplies them out before the launch, ``x_{m,n} F[k, n]`` for every step, so that a
  step reads its samples' rows of that instead of ``F``. When a gradient is required the forward also writes, per
  step, what the backward needs (:data:`SAVED`: ``h_{t-1}``, ``c_{t-1}``, ``h~``, the queries,
  the undropped input and communication probabilities, the gate pre-activations, Q|K|V, the read).
- **Backward — one CUDA kernel launch** (``csrc/kernels/rim_seq_bwd.cuh``): the reverse-time
  sweep, ``dh``/``dc`` of the tile in shared memory, writing per step the gradients of that
  step's keys and input elements and the per-step gradients the weights need (dq, d gates,
  d Q|K|V, dh', xa); the weight gradients are then GEMMs over all ``T*B`` rows (deterministic, no
  atomics), and autograd carries the hoisted products' gradients back to ``x`` and the input
  key/value projections. Dropout keep-decisions are recomputed from the counter-based stream.

Numerics: products accumulate in float32 (float64 for float64) from storage-dtype weights; the
persistent kernels on CUDA cores do not round activations to bfloat16/float16 between products (as
the C++ CPU driver), so half precision results differ from the reference's operand rounding within
the tolerance table; their tensor-core products, the stepped ops' GEMMs and (both paths) the
weight-gradient products after the sweep round each operand (activations, per-step gradients, and
the stepped ops also the folded input matrix ``F``, once per call) to the storage dtype, as the
reference rounds its product operands.
Dropout uses the C++ driver's counter-based stream, so the keep-masks equal ``backend="cpu"``'s
for the same seed (:func:`rims_fast.rim_cpu.dropout_masks`).

Limits: one sample's state and activations must fit a thread block's shared memory (about
33 KB forward / 35 KB backward at the paper layer in float32; the tile shrinks to fit, and a size
whose single sample does not fit — e.g. GRU in float64 with inputs wider than ~480 — raises
``RuntimeError`` saying so). Products run on CUDA cores by default; ``RIMS_FAST_CUDA_MMA=1``
(:func:`mma_mode`) puts both kernels' weight products on tensor cores in float16/bfloat16.
``RIMS_FAST_CUDA_CLUSTER=1`` (:func:`cluster_mechs`, sm_90+) runs the forward's tiles on
thread-block clusters, the mechanisms split over the blocks, each block keeping its own rows and
as many of its mechanisms' weights as fit in its shared memory (:data:`RESIDENT`); on CPU tensors,
``cluster > 0`` runs the blocks as host threads.

``stepped=True`` swaps both kernels for the stepped ops ``rims_fast::rim_steps_fwd`` /
``rim_steps_bwd`` (``csrc/rim_steps_fwd.h``, ``rim_steps_bwd.h``): per step four batched GEMMs
over the whole batch (cuBLAS; five in the GRU forward) and four small kernels, each way, with the
same inputs, outputs and saved activations; the design for layers whose weights do not fit on
chip, where the persistent kernels re-read every weight per tile and step. ``backend="cuda"``
picks one per layer (:func:`use_stepped`: ``RIMS_FAST_CUDA_FWD=auto``, the default, by the
weight elements a step reads; ``persistent`` / ``stepped`` force one; ``cell`` runs the reference
loop with the fused masked cell instead of this op).

The ops' CPU implementations run the same tile functions on the host (no threads, slow): that is
how the kernels' arithmetic is tested without a GPU; both ops also passed the GPU tests on an H100
(benchmarks/results/nvidia-h100-session-2026-11-27a-1.log).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

import torch
from torch import Tensor

from ._backend import assume_constant_result
from . import rim_seq_graph
from ._config import RimConfig, cfg_args, cfg_from
from .reference import compute_dtype
from .row_products import mechanism_rows_product

__all__ = ["rim_seq", "unavailable_reason", "cuda_fwd_mode", "use_stepped", "step_weights",
           "stepped_instead", "STEPPED_MIN_WEIGHTS", "SMEM_ERROR", "tile_size", "mma_mode",
           "cluster_mechs", "cluster_blocks", "RESIDENT", "resident_mode", "xw_mode", "wide_mode",
           "pdl_mode", "fused_mode", "PARAM_NAMES"]

PARAM_NAMES = ("input_key", "input_value", "input_query", "weight_ih", "weight_hh", "bias_ih",
               "bias_hh", "comm_query", "comm_key", "comm_value", "comm_output")
_OP = "rims_fast::rim_seq_fwd"

#: The weights a cluster block can keep in shared memory for its own mechanisms (the op's
#: ``resident`` bit set; ``csrc/kernels/rim_seq_fwd.cuh``, ``RimSeqResident``): name -> bit.
#: ``w_x`` is the input term's matrix (the fold, or ``weight_ih``), in the compute dtype.
RESIDENT = {"weight_hh": 1, "w_x": 2, "comm_query": 4, "comm_key": 8, "comm_value": 16,
            "comm_output": 32, "input_query": 64}


def tile_size() -> int:
    """``RIMS_FAST_CUDA_TILE``: samples per thread block of the persistent kernel, 1..8; 0 (the
    default) takes ``ceil(B / SMs)`` capped at 8 on the GPU (``min(8, B)`` in host runs), fewer
    when shared memory is short; the cluster forward's default is the smallest tile whose
    clusters all run at once (one wave, ``cudaOccupancyMaxActiveClusters``)."""
    v = os.environ.get("RIMS_FAST_CUDA_TILE", "0")
    if not v.isdigit() or int(v) > 8:
        raise ValueError(f"RIMS_FAST_CUDA_TILE must be an integer in 0..8, got {v!r}")
    return int(v)


def mma_mode(device: torch.device, dtype: torch.dtype) -> bool:
    """``RIMS_FAST_CUDA_MMA=1``: the persistent kernels compute their weight products on tensor
    cores (WMMA m8n32k16, float32 accumulation, sm_80+), for float16/bfloat16 on CUDA: forward,
    the gates from ``[xa | h]``, communication Q|K|V from ``h~`` and the output projection from
    the read ``o`` (88% of a step's FLOPs at the paper layer); backward, the same four products
    transposed (d o, dh~, d xa, dh_{t-1}). float32/float64 stay on CUDA cores. Default ``0``:
    it passed the GPU tests on an H100 but no longer beats the CUDA cores at `paper` (8.64
    against 7.27 ms forward in bf16, benchmarks/results/nvidia-h100-bfloat16-2026-11-27a.json).
    Operands (activations, gradients, the folded input matrix) are rounded to the storage dtype,
    as the reference rounds product operands."""
    v = os.environ.get("RIMS_FAST_CUDA_MMA", "0")
    if v not in ("0", "1"):
        raise ValueError(f"RIMS_FAST_CUDA_MMA must be 0 or 1, got {v!r}")
    return (v == "1" and torch.device(device).type == "cuda"
            and dtype in (torch.float16, torch.bfloat16))


def cluster_mechs(device: torch.device, num_units: int, mma: bool) -> int:
    """``RIMS_FAST_CUDA_CLUSTER=1``: the persistent forward runs each tile on a thread-block
    cluster (sm_90+) instead of one block: block ``r`` of the cluster owns mechanisms
    ``r*kpr .. r*kpr + kpr - 1`` with ``kpr = ceil(K / 8)`` (at most 8 blocks, the portable
    cluster size), keeps and computes only their rows and columns, and stores its rows' ``p``
    (for the competition) and communication keys/values into the other blocks' shared memory too
    (DSMEM), a cluster barrier after each of the two. Each block copies as many of its
    mechanisms' weights into its shared memory as fit beside the tile's arrays, largest first
    (:data:`RESIDENT`), and reads them from there every step. ``RIMS_FAST_CUDA_CLUSTER_BLOCKS=N``
    (1..8, default 8) caps the blocks per cluster at N: ``kpr = ceil(K / min(N, K))``, fewer
    blocks per tile with more mechanisms each (smaller clusters to synchronise, more weights per
    block to hold; not yet timed: benchmark provider ``cuda_seq_cluster2``). Returns ``kpr``
    (the op's ``cluster`` argument), 0 when off (the default: it passed the GPU tests on an H100
    but gained nothing at `paper`, README's environment table). CUDA cores only: it cannot be
    combined with ``RIMS_FAST_CUDA_MMA=1``. The backward is the single-block kernel's."""
    v = os.environ.get("RIMS_FAST_CUDA_CLUSTER", "0")
    if v not in ("0", "1"):
        raise ValueError(f"RIMS_FAST_CUDA_CLUSTER must be 0 or 1, got {v!r}")
    blocks = cluster_blocks()
    if v == "0" or torch.device(device).type != "cuda":
        return 0
    if mma:
        raise ValueError("RIMS_FAST_CUDA_CLUSTER=1 runs on CUDA cores; it cannot be combined with "
                         "RIMS_FAST_CUDA_MMA=1")
    return -(-num_units // min(blocks, num_units))


def cluster_blocks() -> int:
    """``RIMS_FAST_CUDA_CLUSTER_BLOCKS``: the most blocks per cluster (1..8; default 8, the
    portable cluster size) with ``RIMS_FAST_CUDA_CLUSTER=1`` (:func:`cluster_mechs`)."""
    v = os.environ.get("RIMS_FAST_CUDA_CLUSTER_BLOCKS", "8")
    if v not in tuple("12345678"):
        raise ValueError(f"RIMS_FAST_CUDA_CLUSTER_BLOCKS must be an integer from 1 to 8, got {v!r}")
    return int(v)


def resident_mode() -> int:
    """``RIMS_FAST_CUDA_RESIDENT``: with ``RIMS_FAST_CUDA_CLUSTER=1``, ``1`` (default) keeps as
    many of each block's weights in shared memory as fit (the op's ``resident=-1``), ``0`` reads
    them all from global memory / L2 (``resident=0``: the comparison that measures what
    residency buys)."""
    v = os.environ.get("RIMS_FAST_CUDA_RESIDENT", "1")
    if v not in ("0", "1"):
        raise ValueError(f"RIMS_FAST_CUDA_RESIDENT must be 0 or 1, got {v!r}")
    return -1 if v == "1" else 0


def xw_mode(mma: bool = False) -> int:
    """``RIMS_FAST_CUDA_XW``: whether the persistent forward hoists the input term out of the
    recurrence — one GEMM before the loop makes ``x_{m,n} F[k, n]`` of every step (``(T, B, M,
    K, n_in, G*H)``, compute dtype) and each step reads its own samples' rows of it instead of the
    fold ``F`` (``n_in * D`` rows per mechanism, re-read by every tile each step: a third of the
    weight bytes at the paper layer). ``auto`` (default, ``-1``): when a tile's ``S * M`` rows are
    fewer than ``F``'s ``D`` and it takes at most 512 MiB, on CUDA cores (not with
    ``RIMS_FAST_CUDA_MMA=1``); ``1``: always (CUDA cores); ``0``: never. The same sums
    reassociated (``a (x F)`` for ``(a x) F``). The persistent backward follows the same rule:
    its sweep then reads no ``F`` either (``d a~`` is ``d gi . (x F)``, one warp per row, head
    and element) and ``d x`` and the read ``xa`` for ``d F`` become GEMMs after the sweep. The
    hoisted products follow torch's TF32 setting, as the reference's do. ``mma``: whether the
    call runs on tensor cores (``1`` then raises ``ValueError``)."""
    v = os.environ.get("RIMS_FAST_CUDA_XW", "auto")
    if v not in ("auto", "0", "1"):
        raise ValueError(f"RIMS_FAST_CUDA_XW must be 'auto', '0' or '1', got {v!r}")
    if v == "1" and mma:
        raise ValueError("RIMS_FAST_CUDA_XW=1 hoists the input term on CUDA cores; it cannot be "
                         "combined with RIMS_FAST_CUDA_MMA=1")
    return -1 if v == "auto" else int(v)


def wide_mode() -> bool:
    """``RIMS_FAST_CUDA_WIDE`` (``1`` by default, or ``0``): whether a persistent kernel launched
    with a tile of one sample on CUDA cores (the automatic tile whenever the batch is at most the
    GPU's SM count, as at the paper layer), or a forward with a tile of two
    (``RIMS_FAST_CUDA_TILE=2``), runs as a 512-thread block compiled for that tile alone (at most
    128 registers a thread), instead of the 256-thread kernel compiled for tiles of up to 8.
    Twice the warps per SM to hide the step's L2 latency; the same arithmetic in the same order,
    so the results are bit-identical. ``0`` keeps the 256-thread kernel (benchmark providers
    ``cuda_seq_narrow``, ``cuda_seq_t2_narrow``, for the side-by-side ratio). The CUDA launcher reads the
    variable itself (``use_wide`` in ``csrc/rim_seq_cuda.cuh``); this checks it first."""
    v = os.environ.get("RIMS_FAST_CUDA_WIDE", "1")
    if v not in ("0", "1"):
        raise ValueError(f"RIMS_FAST_CUDA_WIDE must be 0 or 1, got {v!r}")
    return v == "1"


def pdl_mode() -> bool:
    """``RIMS_FAST_CUDA_PDL`` (``0`` by default, or ``1``): whether the stepped ops' phase kernels
    launch with programmatic dependent launch (programmatic stream serialization, sm_90+), so
    that each may be scheduled while the cuBLAS GEMM it follows drains and waits for that GEMM's
    results on the device (``griddepcontrol.wait``) instead of the launch waiting for it to retire.
    The kernels and results are the same either way; on a GPU below compute capability 9.0 ``1``
    raises. Opt-in until timed on a GPU (benchmark providers ``cuda_steps_pdl``,
    ``cuda_steps_graph_pdl``). The CUDA launcher reads the variable itself (``use_pdl`` in
    ``csrc/rim_steps_cuda.cuh``); this checks it first."""
    v = os.environ.get("RIMS_FAST_CUDA_PDL", "0")
    if v not in ("0", "1"):
        raise ValueError(f"RIMS_FAST_CUDA_PDL must be 0 or 1, got {v!r}")
    return v == "1"


def fused_mode() -> bool:
    """``RIMS_FAST_CUDA_FUSED`` (``0`` by default, or ``1``): whether the stepped forward runs two
    of its products as tensor-core kernels with the pointwise work that follows them in their
    epilogue, instead of a cuBLAS GEMM and a small kernel each: the LSTM gate product with the
    cell (``csrc/kernels/rim_step_gates.cuh``; a GRU layer keeps the GEMMs and the cell kernel)
    and the communication output product with the residual (``csrc/kernels/rim_step_output.cuh``).
    Two launches per step fewer for an LSTM (one for a GRU), and the float32 gates and output
    never written out. On the GPU it applies to float16/bfloat16 layers on compute capability 8.0
    or newer; other layers run the GEMM path, with a one-time warning. The results equal the GEMM path's to float32 rounding (the products sum in
    another order), not bit for bit. Opt-in until timed on a GPU (benchmark providers
    ``cuda_steps_fused``, ``cuda_steps_graph_fused``). The ops read the variable themselves
    (``use_fused`` in ``csrc/rim_steps_fwd.h``); this checks it first."""
    v = os.environ.get("RIMS_FAST_CUDA_FUSED", "0")
    if v not in ("0", "1"):
        raise ValueError(f"RIMS_FAST_CUDA_FUSED must be 0 or 1, got {v!r}")
    return v == "1"


def cuda_fwd_mode() -> str:
    """``RIMS_FAST_CUDA_FWD``: ``"auto"`` (default: per layer, the persistent kernels or the
    stepped ops, :func:`use_stepped`), ``"persistent"`` (:func:`rim_seq`, the persistent
    kernels), ``"stepped"`` (:func:`rim_seq` with ``stepped=True``: forward and backward as
    batched GEMMs and four small kernels per step, ``rims_fast::rim_steps_fwd`` /
    ``rim_steps_bwd``) or ``"cell"`` (the reference loop with the fused masked cell)."""
    mode = os.environ.get("RIMS_FAST_CUDA_FWD", "auto")
    if mode not in ("auto", "cell", "persistent", "stepped"):
        raise ValueError("RIMS_FAST_CUDA_FWD must be 'auto', 'cell', 'persistent' or 'stepped', "
                         f"got {mode!r}")
    return mode


#: ``RIMS_FAST_CUDA_FWD=auto`` runs a layer on the stepped ops when a step reads more weight
#: elements than this (:func:`step_weights`), else on the persistent kernels, which re-read every
#: weight once per tile of <= 8 samples and step. Placed between the two configs timed on an H100
#: (bf16): `paper`, 0.74M elements, where the persistent kernels were faster (7.3 against 13.3 ms
#: forward, 22.6 against 28.0 ms fwd+bwd), and `large`, 7.5M, where the stepped ops were (87.5
#: against 367 ms forward with tensor cores, 274 against 1219 ms fwd+bwd);
#: benchmarks/results/nvidia-h100-bfloat16-2026-11-27a.json, nvidia-h100-large-bfloat16-2026-11-27a.json.
#: Sizes in between are untimed.
STEPPED_MIN_WEIGHTS = 1 << 21


def step_weights(cfg: RimConfig, xw: int) -> int:
    """Weight elements one step of a layer reads: the recurrent and input-term gate weights
    (``xw`` rows of the input term: ``n_in * D`` for the folded matrix, ``n_in * d_v`` for
    ``weight_ih``), the input query, communication Q|K|V and output."""
    K, H, GH = cfg.num_units, cfg.hidden_size, cfg.gates * cfg.hidden_size
    nk = cfg.input_heads * cfg.input_key_size
    ck, cv = cfg.comm_heads * cfg.comm_key_size, cfg.comm_heads * cfg.comm_value_size
    return K * (GH * (H + xw) + H * (nk + 2 * ck + cv) + cv * H)


_logged_choices: set = set()


def use_stepped(cfg: RimConfig, xw: int) -> bool:
    """Whether ``backend="cuda"`` runs this layer on the stepped ops: ``RIMS_FAST_CUDA_FWD=stepped``,
    or ``auto`` and :func:`step_weights` above :data:`STEPPED_MIN_WEIGHTS` (the choice is logged
    once per layer shape on the ``rims_fast`` logger, INFO)."""
    mode = cuda_fwd_mode()
    if mode != "auto":
        return mode == "stepped"
    w = step_weights(cfg, xw)
    stepped = w > STEPPED_MIN_WEIGHTS
    key = (cfg, xw)
    # Not while torch.compile traces: Dynamo cannot trace the logging module (the eager call logs).
    if not torch.compiler.is_compiling() and key not in _logged_choices:
        _logged_choices.add(key)
        logging.getLogger("rims_fast").info(
            "rims_fast: backend='cuda' (RIMS_FAST_CUDA_FWD=auto) runs K=%d H=%d on the %s (%d "
            "weight elements per step, threshold %d)", cfg.num_units, cfg.hidden_size,
            "stepped ops" if stepped else "persistent kernels", w, STEPPED_MIN_WEIGHTS)
    return stepped


#: The persistent launcher's error when one sample's state and activations exceed a thread
#: block's shared memory (csrc/rim_seq_cuda.cuh, fit_tile).
SMEM_ERROR = "bytes of shared memory"


def stepped_instead(e: RuntimeError, cfg: RimConfig) -> bool:
    """Whether a call that ``RIMS_FAST_CUDA_FWD=auto`` gave to the persistent kernels and that
    raised ``e`` reruns on the stepped ops: only for the persistent launcher's shared-memory limit
    (the weight count does not see it: a narrow layer with wide inputs can exceed it), said as a
    warning on the ``rims_fast`` logger. The launcher raises before anything runs."""
    if SMEM_ERROR not in str(e):
        return False
    logging.getLogger("rims_fast").warning(
        "rims_fast: backend='cuda' (RIMS_FAST_CUDA_FWD=auto) runs K=%d H=%d on the stepped ops: "
        "it does not fit the persistent kernels (%s)", cfg.num_units, cfg.hidden_size,
        str(e).splitlines()[0])
    return True


def input_rows(cfg: RimConfig, M: int, D: int) -> int:
    """Rows of the input term's matrix as :func:`_hoisted` builds it (the fold or ``weight_ih``)."""
    return cfg.input_heads * (D if M * D <= cfg.input_value_size else cfg.input_value_size)


# torch.compile evaluates this at trace time: it depends only on the build, device and dtype.
@assume_constant_result
def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` if the op runs on tensors of this device and dtype (CPU: float32/float64, the
    host run for tests; CUDA: all four float dtypes), else why not."""
    from . import masked_cell
    if not masked_cell.HAVE_C:
        return f"the extension rims_fast._C is not available: {masked_cell.C_IMPORT_ERROR}"
    device = torch.device(device)
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key)
    except RuntimeError:
        ok = False
    if not ok:
        return f"rims_fast._C has no {key} kernel of {_OP} (rebuild it; CUDA needs a CUDA build)"
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        return "the host run of rim_seq_fwd takes float32 and float64"
    return None


def _hoisted(x: Tensor, p: Mapping[str, Tensor], cfg: RimConfig) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``keys``, the input term's source ``xsrc``, its matrix ``w_x`` and whether ``xsrc`` holds
    per-head values (in the compute dtype)."""
    T, B, M, D = x.shape
    K, n, dv, GH = cfg.num_units, cfg.input_heads, cfg.input_value_size, cfg.gates * cfg.hidden_size
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    keys = xc @ p["input_key"].to(ct)
    w_ih = p["weight_ih"].to(ct).view(K, n, dv, GH)
    if M * D <= dv:  # fold input_value_n weight_ih[k]_n: (K, n, D, GH)
        w_x = torch.einsum("dnv,knvg->kndg", p["input_value"].to(ct).view(D, n, dv), w_ih)
        return keys.contiguous(), xc.contiguous(), w_x.contiguous(), False
    vals = xc @ p["input_value"].to(ct)
    return keys.contiguous(), vals.contiguous(), w_ih.contiguous(), True


#: Weights of the C++ ops, in their order (the input key/value projections are hoisted).
OP_WEIGHTS = ("input_query", "weight_hh", "bias_ih", "bias_hh", "comm_query", "comm_key",
              "comm_value", "comm_output")
#: Activations the forward saves for the backward kernel (compute dtype, (T, B, K, width)).
SAVED = ("h", "c", "ht", "q", "a", "gates", "qkv", "b", "o")


def _saved_widths(cfg: RimConfig, M: int) -> list[int]:
    H, G = cfg.hidden_size, cfg.gates
    lstm = cfg.cell == "lstm"
    ck, cv = cfg.comm_heads * cfg.comm_key_size, cfg.comm_heads * cfg.comm_value_size
    return [H, H if lstm else 0, H, cfg.input_heads * cfg.input_key_size, cfg.input_heads * M,
            G * H if lstm else 2 * G * H, 2 * ck + cv, cfg.comm_heads * cfg.num_units, cv]


def _register_fake() -> None:
    """Shapes of the C++ ops for torch.compile / opcheck."""

    @torch.library.register_fake(_OP)
    def seq_fwd_fake(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih, bias_hh,
                     comm_query, comm_key, comm_value, comm_output, top_k, input_heads,
                     comm_heads, per_head, input_dropout, comm_dropout, seed, tile, save,
                     mma=False, cluster=0, resident=-1, xw=-1):
        T, B, M, _ = keys.shape
        K, H, GH = weight_hh.shape
        lstm = GH == 4 * H
        ck, cv = comm_query.shape[-1], comm_value.shape[-1]
        new = h0.new_empty
        res = [new((T, B, K * H)), new((B, K, H)), new((B, K, H) if lstm else (0,)),
               h0.new_empty((T, B, K), dtype=torch.bool)]
        widths = [H, H if lstm else 0, H, input_query.shape[-1], input_heads * M,
                  GH if lstm else 2 * GH, 2 * ck + cv, comm_heads * K, cv]
        res += [keys.new_empty((T, B, K, w) if save and w else (0,)) for w in widths]
        return res

    @torch.library.register_fake("rims_fast::rim_steps_fwd")
    def _(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih, bias_hh, comm_query,
          comm_key, comm_value, comm_output, top_k, input_heads, comm_heads, per_head,
          input_dropout, comm_dropout, seed, save):
        return seq_fwd_fake(
            keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih, bias_hh, comm_query,
            comm_key, comm_value, comm_output, top_k, input_heads, comm_heads, per_head,
            input_dropout, comm_dropout, seed, 1, save)

    @torch.library.register_fake("rims_fast::rim_seq_bwd")
    @torch.library.register_fake("rims_fast::rim_steps_bwd")
    def _(grad_out, grad_h_n, grad_c_n, keys, xsrc, w_x, h0, c0, input_query, weight_hh, *rest):
        T, B, M, _ = keys.shape
        K, H, GH = weight_hh.shape
        lstm = GH == 4 * H
        comm_query, comm_value = rest[2], rest[4]
        ck, cv = comm_query.shape[-1], comm_value.shape[-1]
        new = keys.new_empty
        return [new(keys.shape), new(xsrc.shape), new((B, K, H)), new((B, K, H) if lstm else (0,)),
                new((T, B, K, input_query.shape[-1])), new((T, B, K, GH if lstm else 2 * GH)),
                new((T, B, K, 2 * ck + cv)), new((T, B, K, H)),
                new((T, B, K, w_x.shape[1] * w_x.shape[2]))]


if unavailable_reason(torch.device("cpu"), torch.float32) is None:
    _register_fake()


@torch.library.custom_op("rims_fast::rim_seq", mutates_args=(), device_types=("cuda", "cpu"))
def rim_seq_op(keys: Tensor, xsrc: Tensor, w_x: Tensor, h0: Tensor, c0: Optional[Tensor],
               weights: list[Tensor], sizes: list[int], cell: str, input_dropout: float,
               comm_dropout: float, block_inactive_grad: bool, per_head: bool, seed: int,
               tile: int, save: bool, mma: bool, cluster: int, resident: int, xw: int,
               stepped: bool) -> list[Tensor]:
    """The whole sequence from hoisted ``keys``, input-term source ``xsrc`` and its matrix ``w_x``
    (compute dtype): ``[out, h_n, c_n (empty for GRU), masks, *saved]`` (:data:`SAVED`, empty
    unless ``save``). Dropout probabilities are the effective ones (0 outside training).
    ``mma``: the weight products on tensor cores (:func:`mma_mode`; the backward follows);
    ``cluster``: mechanisms per block of a thread-block cluster, 0 for one block per tile
    (:func:`cluster_mechs`; forward only); ``resident``: with a cluster, the bit set of the
    weights a block keeps in shared memory (:data:`RESIDENT`; -1: on the GPU as many as fit,
    largest first, on CPU tensors all); ``stepped``: the forward is ``rims_fast::rim_steps_fwd``
    and the backward ``rim_steps_bwd`` (batched GEMMs and four small kernels per step; ``tile``,
    ``mma``, ``cluster``, ``resident`` and ``xw`` do not apply); ``xw``: hoist the input term
    (:func:`xw_mode`: -1 auto, 0, 1). No argument has a default: torch 2.11's dispatcher drops
    an argument equal to its default before autograd, then rejects the backward's gradient for it
    (one per argument, as setup_context sees them)."""
    cfg = cfg_from(sizes, cell, input_dropout, comm_dropout, block_inactive_grad)
    if stepped:
        return list(torch.ops.rims_fast.rim_steps_fwd(
            keys, xsrc, w_x, h0, c0, *weights, cfg.top_k, cfg.input_heads, cfg.comm_heads,
            per_head, input_dropout, comm_dropout, seed, save))
    return list(torch.ops.rims_fast.rim_seq_fwd(
        keys, xsrc, w_x, h0, c0, *weights, cfg.top_k, cfg.input_heads, cfg.comm_heads, per_head,
        input_dropout, comm_dropout, seed, tile, save, mma, cluster, resident, xw))


@rim_seq_op.register_fake
def _(keys, xsrc, w_x, h0, c0, weights, sizes, cell, input_dropout, comm_dropout,
      block_inactive_grad, per_head, seed, tile, save, mma, cluster, resident, xw, stepped):
    cfg = cfg_from(sizes, cell, input_dropout, comm_dropout, block_inactive_grad)
    T, B, M, _ = keys.shape
    K, H = cfg.num_units, cfg.hidden_size
    res = [h0.new_empty(T, B, K * H), h0.new_empty(B, K, H),
           h0.new_empty(B, K, H) if cell == "lstm" else h0.new_empty(0),
           h0.new_empty(T, B, K, dtype=torch.bool)]
    res += [keys.new_empty((T, B, K, w) if save and w else (0,)) for w in _saved_widths(cfg, M)]
    return res


def _setup_context(ctx, inputs, output):
    (keys, xsrc, w_x, h0, c0, weights, sizes, cell, p_in, p_c, big, per_head, seed, tile,
     save, mma, _cluster, _resident, xw, stepped) = inputs
    ctx.mma = mma
    ctx.xw = xw
    ctx.stepped = stepped
    ctx.cfg = cfg_from(sizes, cell, p_in, p_c, big)
    ctx.args = (per_head, p_in, p_c, seed, tile)
    ctx.has_c0 = c0 is not None
    ctx.save = save
    ctx.dtypes = (h0.dtype, [w.dtype for w in weights])
    ctx.mark_non_differentiable(*output[3:])
    ctx.save_for_backward(keys, xsrc, w_x, h0, *([c0] if c0 is not None else []), *weights,
                          *output[3:])


def _backward(ctx, grads):
    if not ctx.save:
        raise RuntimeError("rims_fast::rim_seq ran with save=False (no input required grad), so "
                           "it cannot be differentiated")
    cfg = ctx.cfg
    per_head, p_in, p_c, seed, tile = ctx.args
    saved = ctx.saved_tensors
    keys, xsrc, w_x, h0 = saved[:4]
    i = 5 if ctx.has_c0 else 4
    c0 = saved[4] if ctx.has_c0 else None
    weights = list(saved[i:i + len(OP_WEIGHTS)])
    masks, acts = saved[i + len(OP_WEIGHTS)], list(saved[i + len(OP_WEIGHTS) + 1:])
    ct = keys.dtype
    lstm = cfg.cell == "lstm"
    g_out, g_hn, g_cn = grads[0], grads[1], grads[2] if lstm else None
    up = lambda g: None if g is None else g.to(ct).contiguous()  # noqa: E731
    args = (up(g_out), up(g_hn), up(g_cn), keys, xsrc, w_x, h0, c0, *weights, masks, acts,
            cfg.top_k, cfg.input_heads, cfg.comm_heads, per_head, p_in, p_c, seed,
            cfg.block_inactive_grad)
    if ctx.stepped:  # the stepped backward: batched GEMMs and four small kernels per step
        res = torch.ops.rims_fast.rim_steps_bwd(*args)
    else:
        res = torch.ops.rims_fast.rim_seq_bwd(*args, tile, ctx.mma, ctx.xw)
    (d_keys, d_xsrc, d_h0, d_c0, dq, dg, dqkv, dhp, xa) = res
    # Weight gradients: GEMMs over all T*B rows of the sweep's per-step gradients. In half
    # precision their operands are rounded to the storage dtype, as the reference's autograd has
    # them (tensor cores, float32 accumulation): in float32 they ran on CUDA cores, ~49 ms of a
    # 274 ms `large` fwd+bwd on an H100 (benchmarks/results/nvidia-h100-profile-steps-2026-11-27a.log).
    h_dt, w_dts = ctx.dtypes
    op = (lambda a: a.to(h_dt)) if h_dt in (torch.float16, torch.bfloat16) else (lambda a: a)  # noqa: E731
    T, B = keys.shape[:2]
    K, GH = cfg.num_units, cfg.gates * cfg.hidden_size
    hprev, ht, o = op(acts[0]), op(acts[2]), op(acts[8])
    dgi, dgh = (dg, dg) if lstm else (dg[..., :GH], dg[..., GH:])
    ck = cfg.comm_heads * cfg.comm_key_size
    g_c = mechanism_rows_product(ht, op(dqkv))
    dgh_op = op(dgh)
    dgi_op = dgh_op if lstm else op(dgi)
    g = {
        "input_query": mechanism_rows_product(hprev, op(dq)),
        "weight_hh": mechanism_rows_product(hprev, dgh_op),
        "bias_ih": dgi.sum((0, 1)),
        "bias_hh": dgh.sum((0, 1)),
        "comm_query": g_c[..., :ck],
        "comm_key": g_c[..., ck:2 * ck],
        "comm_value": g_c[..., 2 * ck:],
        "comm_output": mechanism_rows_product(o, op(dhp)),
    }
    n, Dx = w_x.shape[1], w_x.shape[2]
    d_wx = mechanism_rows_product(op(xa).view(T, B, K, n * Dx), dgi_op).view(K, n, Dx, -1)
    d_wx = d_wx.to(w_x.dtype)
    d_weights = [g[name].to(dt).contiguous() for name, dt in zip(OP_WEIGHTS, w_dts)]
    return (d_keys, d_xsrc, d_wx, d_h0.to(h_dt), d_c0.to(h_dt) if ctx.has_c0 else None,
            d_weights, *(None,) * 14)  # sizes ... xw, stepped


rim_seq_op.register_autograd(_backward, setup_context=_setup_context)


def rim_seq(x: Tensor, h0: Tensor, c0: Optional[Tensor], params: Mapping[str, Tensor],
            cfg: RimConfig, *, training: bool = False, seed: Optional[int] = None,
            tile: Optional[int] = None, mma: Optional[bool] = None,
            cluster: Optional[int] = None, resident: Optional[int] = None,
            stepped: Optional[bool] = None, xw: Optional[int] = None,
            ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """One RIM layer over a sequence with the persistent kernels; :func:`rim_ref`'s contract.
    ``seed``: the dropout seed (``None``: drawn from PyTorch's generator when dropout is on);
    ``tile``: samples per thread block, 1..8 (0: automatic, see :func:`tile_size`; None:
    :func:`tile_size`); ``mma``: weight products on tensor cores (None: :func:`mma_mode`; on CPU
    tensors ``True`` runs the tensor-core tiling in the host run, for tests); ``cluster``:
    mechanisms per block of a thread-block cluster for the forward, 0 for none (None:
    :func:`cluster_mechs`; on CPU tensors > 0 runs the cluster's blocks as host threads, for
    tests); ``resident``: with a cluster, which weights a block keeps in shared memory, a bit set
    of :data:`RESIDENT` (None: :func:`resident_mode`: as many as fit on the GPU, largest first,
    all in the host run; or none); ``stepped``: forward and backward as batched GEMMs over the
    whole batch and four small kernels per step (``rims_fast::rim_steps_fwd`` / ``rim_steps_bwd``,
    for layers whose weights do not fit on chip; ``tile``, ``mma``, ``cluster`` and ``resident``
    are then ignored; None: :func:`use_stepped`, and with ``RIMS_FAST_CUDA_FWD=auto`` a layer
    that does not fit the persistent kernels' shared memory reruns on the stepped ops,
    :func:`stepped_instead`; not under ``RIMS_FAST_CUDA_GRAPH=1``); ``xw``: hoist the input
    term out of the persistent forward's recurrence (None: :func:`xw_mode`). Gradients flow into
    ``x``, ``h0``, ``c0`` and all parameters (the input key/value projections through the hoisted
    PyTorch products)."""
    why = unavailable_reason(x.device, x.dtype)
    if why is not None:
        raise RuntimeError(why)
    if tile is None:
        tile = tile_size()
    # Switches the C++ ops read themselves: checked here first, and part of a graph's key (a
    # captured graph keeps the kernels of capture time).
    cpp_modes = (wide_mode(), pdl_mode(), fused_mode())
    if mma is None:
        mma = mma_mode(x.device, x.dtype)
    auto = stepped is None and cuda_fwd_mode() == "auto"
    if stepped is None:
        stepped = use_stepped(cfg, input_rows(cfg, x.shape[2], x.shape[3]))
    if stepped:  # the options of the persistent kernels do not apply
        tile, mma, cluster, resident, xw = 0, False, 0, 0, 0
    if xw is None:
        xw = xw_mode(mma)
    if cluster is None:
        cluster = cluster_mechs(x.device, cfg.num_units, mma)
    sizes, cell, p_in, p_c, big = cfg_args(cfg)
    if not training:
        p_in = p_c = 0.0
    if seed is None:
        from .rim_cpu import draw_seed
        seed = draw_seed() if (p_in > 0 or p_c > 0) else 0
    lstm = cfg.cell == "lstm"
    if resident is None:
        resident = resident_mode()

    def run(x: Tensor, h0: Tensor, c0: Optional[Tensor]) -> tuple:
        keys, xsrc, w_x, per_head = _hoisted(x, params, cfg)
        weights = [params[n] for n in OP_WEIGHTS]
        leaves = (keys, xsrc, w_x, h0, c0, *weights)
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
        res = rim_seq_op(keys, xsrc, w_x, h0, c0, weights, sizes, cell, p_in, p_c, big,
                         per_head, seed, tile, save, mma, cluster, resident, xw, stepped)
        return res[0], res[1], (res[2] if lstm else None), res[3]

    h0 = h0.contiguous()
    c0 = c0.contiguous() if lstm else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, *params.values()))
    if (x.is_cuda and not needs_grad and p_in == 0 and p_c == 0 and rim_seq_graph.graph_mode()
            and not torch.cuda.is_current_stream_capturing()):  # no capture inside a capture
        return rim_seq_graph.replay(("rim_seq", cfg, tile, mma, cluster, resident, stepped, xw,
                                     cpp_modes), run,
                                    x, h0, c0, dict(params))
    try:
        return run(x, h0, c0)
    except RuntimeError as e:
        if not (auto and not stepped and stepped_instead(e, cfg)):
            raise
    return rim_seq(x, h0, c0, params, cfg, training=training, seed=seed, stepped=True)
