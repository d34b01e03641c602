"""``backend="cpu"``: the C++ sequence driver (``csrc/rim_cpu.cpp``), one call per sequence.

:func:`rim_cpu` has exactly :func:`rims_fast.reference.rim_ref`'s contract. The forward and the
hand-written backward through time are the ops ``torch.ops.rims_fast.rim_cpu_kv_fwd`` /
``rim_cpu_kv_bwd`` of the compiled extension ``rims_fast._C``; their fake impls (for
``torch.compile``) and the autograd formula are registered here, so a whole sequence is one graph
node.

dtypes: float32 and float64 run as they are; bfloat16 and float16 are computed in float32 (SPEC
"Dtypes": inputs, state and parameters are converted up, ``out``/``h_n``/``c_n`` rounded back, the
state carried in float32 inside the call).

Input term: :func:`rim_cpu` runs the driver's pre-projected op (``rim_cpu_kv_fwd``) for every
call. When ``M*D <= d_v`` (the reference's rule, ``reference._InputGates``) the values are the
input elements themselves, one copy per head, and ``weight_ih`` is replaced by the fold
``input_value_n weight_ih[k]_n`` (``(n D, G*H)`` per mechanism, :func:`input_fold`); otherwise the
values are ``x input_value`` and ``weight_ih`` is used in place. The choice depends on the layer,
not on ``T``, so splitting a sequence into calls (``RIMCell`` steps) gives exactly one call's
result (SPEC "Dtypes"). The fold (``K n D d_v G H`` multiply-adds, 123 MFLOP at the paper layer)
is made in every call (:func:`input_fold` says why it is not cached) and never differentiated
through: :class:`_FoldedInput` takes the fold's gradient to ``input_value`` and ``weight_ih``
itself, densely or, for calls with few rows, from per-row factors
(:func:`fold_grad_from_factors`), so a one-step forward+backward does not pay 2 x 123 MFLOP
more.

Dropout: one 64-bit seed per call is drawn from PyTorch's default generator (so it is
reproducible under ``torch.manual_seed``); the C++ side derives every keep-decision from it with a
counter-based stream, and the backward replays the same decisions. :func:`dropout_masks` returns
them in ``rim_ref``'s ``dropout_masks`` layout.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from ._backend import assume_constant_result
from ._config import RimConfig
from .reference import compute_dtype

__all__ = ["unavailable_reason", "rim_cpu", "rim_cpu_kv", "dropout_masks", "draw_seed",
           "input_fold", "folds_input", "PARAM_NAMES", "KV_PARAM_NAMES"]

#: The op's parameter order (SPEC's table).
PARAM_NAMES = ("input_key", "input_value", "input_query", "weight_ih", "weight_hh", "bias_ih",
               "bias_hh", "comm_query", "comm_key", "comm_value", "comm_output")
#: Parameters of the pre-projected op ``rim_cpu_kv_fwd`` (no input key/value projection).
KV_PARAM_NAMES = PARAM_NAMES[2:]
_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_OP = "rims_fast::rim_cpu_kv_fwd"


def _op_registered() -> Optional[str]:
    """None if the driver's ops are loaded, else why not."""
    from . import masked_cell  # loads rims_fast._C (and says why not when it fails)
    if not masked_cell.HAVE_C:
        return f"the extension rims_fast._C is not available: {masked_cell.C_IMPORT_ERROR}"
    try:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CPU")
    except RuntimeError:  # the op does not exist: an older build of _C
        registered = False
    if not registered:
        return "rims_fast._C was built without the C++ sequence driver (rim_cpu_kv_fwd); rebuild it"
    return None


# torch.compile evaluates this at trace time: it depends only on the build, device and dtype.
@assume_constant_result
def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` if ``backend="cpu"`` can run on tensors of this device and dtype, else why not."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"backend='cpu' (the C++ sequence driver) needs CPU tensors, got device {device}"
    if dtype not in _SUPPORTED:
        return f"backend='cpu' supports float32, float64, bfloat16 and float16, got {dtype}"
    return _op_registered()


def folds_input(M: int, D: int, cfg: RimConfig) -> bool:
    """Whether :func:`rim_cpu` folds ``input_value`` into ``weight_ih``: ``M*D <= d_v``, the
    reference's rule (the folded input term has ``n D`` rows per mechanism instead of ``n d_v``).
    It depends on the layer only, never on ``T`` or ``B``."""
    return M * D <= cfg.input_value_size


def input_fold(input_value: Tensor, weight_ih: Tensor, cfg: RimConfig, ct: torch.dtype) -> Tensor:
    """``fold[k, n*D + d, :] = sum_v input_value[d, n*d_v + v] weight_ih[k, n*d_v + v, :]``:
    ``(K, n D, G*H)`` in the compute dtype ``ct``, the ``weight_ih`` of the pre-projected op when
    its values are the input elements repeated per head; one batched matmul (123 MFLOP, ~0.3 ms
    on 2 cores at the paper layer). Made in every call, never differentiated through
    (:class:`_FoldedInput` forms the two weights' gradients itself).

    Not cached: a cache must know when either weight changed, and the version counter misses
    writes through ``.data`` (``target.data.copy_(...)``, as RL libraries update target
    networks), while comparing the weights' values reads ~4 MB, which measured as long as the
    fold itself (both ~0.26-0.29 ms here)."""
    K, n, dv, GH = cfg.num_units, cfg.input_heads, cfg.input_value_size, cfg.gates * cfg.hidden_size
    D = input_value.shape[0]
    with torch.no_grad():
        return torch.matmul(input_value.detach().to(ct).view(D, n, dv).transpose(0, 1),
                            weight_ih.detach().to(ct).view(K, n, dv, GH)).reshape(K, n * D, GH)


def rim_cpu(x: Tensor, h0: Tensor, c0: Optional[Tensor], params: Mapping[str, Tensor],
            cfg: RimConfig, *, training: bool = False,
            ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """One RIM layer over a sequence with the C++ driver; :func:`rims_fast.rim_ref`'s contract.

    Args:
        x: ``(T, B, M, D)`` input elements, time-major (any strides).
        h0, c0: ``(B, K, H)`` initial state (``c0`` None for GRU).
        params: the layer's parameters by SPEC name.
        cfg: the layer's :class:`RimConfig`.
        training: dropout is applied only when true (and its probability > 0).

    Returns:
        ``out (T, B, K*H)`` in ``x.dtype``, ``h_n``, ``c_n`` (``None`` for GRU) ``(B, K, H)``,
        ``masks (T, B, K)`` bool. Differentiable w.r.t. ``x``, ``h0``, ``c0`` and all parameters.
    """
    why = unavailable_reason(x.device, x.dtype)
    if why is not None:
        raise RuntimeError(why)
    dtype, ct = x.dtype, compute_dtype(x.dtype)
    lstm = cfg.cell == "lstm"
    if (c0 is not None) != lstm:
        raise ValueError("c0 must be given for cell='lstm' and None for cell='gru'")
    up = (lambda t: t.to(ct)) if ct != dtype else (lambda t: t)
    weights = [up(params[n]) for n in PARAM_NAMES]
    p_in = cfg.input_dropout if training else 0.0
    p_c = cfg.comm_dropout if training else 0.0
    seed = draw_seed() if p_in > 0.0 or p_c > 0.0 else 0
    T, B, M, D = x.shape
    xc = up(x)
    kv_params = dict(zip(PARAM_NAMES, weights))
    keys = xc @ kv_params["input_key"]
    if folds_input(M, D, cfg):  # values = x per head, weight_ih = the fold
        n = cfg.input_heads
        values = xc.repeat(1, 1, 1, n) if n > 1 else xc
        fold = input_fold(params["input_value"], params["weight_ih"], cfg, ct)
        leaves = (x, h0, c0, *[params[n] for n in PARAM_NAMES])
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
        out, h_n, c_n, masks = _FoldedInput.apply(
            keys, values, up(h0), up(c0) if lstm else None, weights[1], weights[3], fold,
            *[kv_params[n] for n in _FOLDED_REST], cfg, p_in, p_c, seed, save)
    else:
        values = xc @ kv_params["input_value"]
        out, h_n, c_n, masks = rim_cpu_kv(keys, values, up(h0), up(c0) if lstm else None,
                                          kv_params, cfg, training=training, seed=seed)
    if ct != dtype:
        out, h_n = out.to(dtype), h_n.to(dtype)
        c_n = c_n.to(dtype) if lstm else c_n
    return out, h_n, (c_n if lstm else None), masks


#: The pre-projected op's parameters after weight_ih, in its order.
_FOLDED_REST = tuple(n for n in KV_PARAM_NAMES if n != "weight_ih")


def fold_grad_from_factors(rows: int, D: int, GH: int) -> bool:
    """Whether :class:`_FoldedInput` forms the ``input_value`` / ``weight_ih`` gradients from
    the per-row factors of the fold's gradient (``xa`` and ``d gi``: about ``rows (D + G H)``
    multiply-adds per mechanism, head and value column) rather than from the dense fold gradient
    (``D G H``): true for calls of fewer than ``D G H / (D + G H)`` rows (``T B``; at most 55 at
    the paper layer), such as an RL rollout's one-step calls."""
    return rows * (D + GH) < D * GH


class _FoldedInput(torch.autograd.Function):
    """The pre-projected op on the input elements with ``weight_ih`` = the fold
    ``input_value_n weight_ih[k]_n`` (:func:`input_fold`), differentiable w.r.t. keys,
    values, state, ``input_value``, ``weight_ih`` and the other 8 weights. The fold's gradient
    ``g_F[k] = sum_rows xa^T d gi`` is taken to the two weights either densely
    (``2 K n D d_v G H`` FLOPs, 246 M at the paper layer, whatever the call's size) or, for calls
    with few rows (:func:`fold_grad_from_factors`), through the factors the op returns:
    ``g weight_ih[k]_n = (xa_n input_value_n)^T d gi`` and ``g input_value_n = sum_k xa_n^T
    (d gi weight_ih[k]_n^T)``. ``save``: keep what the backward needs (decided by the caller:
    inside ``forward`` grad mode is always off)."""

    @staticmethod
    def forward(ctx, keys, values, h0, c0, input_value, weight_ih, fold, input_query, weight_hh,
                bias_ih, bias_hh, comm_query, comm_key, comm_value, comm_output, cfg, p_in, p_c,
                seed, save):
        rest = (input_query, weight_hh, bias_ih, bias_hh, comm_query, comm_key, comm_value,
                comm_output)
        res = torch.ops.rims_fast.rim_cpu_kv_fwd(
            keys, values, h0, c0, input_query, fold, *rest[1:], cfg.top_k, cfg.input_heads,
            cfg.comm_heads, p_in, p_c, seed, cfg.block_inactive_grad, save)
        out, h_n, c_n, masks, *saved = res
        ctx.cfg, ctx.args = cfg, (p_in, p_c, seed)
        ctx.has_c0 = c0 is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(masks)
        if save:
            ctx.save_for_backward(keys, values, h0, c0, input_value, weight_ih, fold, *rest, out,
                                  masks, *saved)
        return out, h_n, (c_n if c0 is not None else None), masks

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward (the op has none)
    def backward(ctx, g_out, g_hn, g_cn, _g_masks):
        cfg, (p_in, p_c, seed) = ctx.cfg, ctx.args
        (keys, values, h0, c0, input_value, weight_ih, fold, *rest) = ctx.saved_tensors
        weights, out, masks, saved = rest[:8], rest[8], rest[9], rest[10:]
        T, B = keys.shape[:2]
        K, nD, GH = fold.shape
        n, dv = cfg.input_heads, cfg.input_value_size
        D = nD // n
        factors = fold_grad_from_factors(T * B, D, GH)
        grads = torch.ops.rims_fast.rim_cpu_kv_bwd(
            g_out, g_hn, g_cn if ctx.has_c0 else None, keys, values, h0, c0, weights[0], fold,
            *weights[1:], out, masks, *saved, cfg.top_k, cfg.input_heads, cfg.comm_heads, p_in,
            p_c, seed, cfg.block_inactive_grad, factors)
        g_keys, g_values, g_h0, g_c0, g_wq, g_fold, *g_rest = grads[:13]
        ct = fold.dtype
        iv = input_value.to(ct).view(D, n, dv)
        wih = weight_ih.to(ct).view(K, n, dv, GH)
        need_iv, need_wih = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        g_iv = g_wih = None  # frozen weights: no 2 x 123 MFLOP (dense) for nothing
        if factors:
            xa = grads[13].view(T * B, K, n, D)
            dgi = grads[14].view(T * B, K, GH)
            if need_wih:
                g_wih = torch.einsum("rknv,rkg->knvg", torch.einsum("rknd,dnv->rknv", xa, iv),
                                     dgi)
            if need_iv:
                g_iv = torch.einsum("rknd,rknv->dnv", xa,
                                    torch.einsum("rkg,knvg->rknv", dgi, wih))
        else:
            g_f = g_fold.view(K, n, D, GH)
            if need_wih:
                g_wih = torch.einsum("dnv,kndg->knvg", iv, g_f)
            if need_iv:
                g_iv = torch.einsum("kndg,knvg->dnv", g_f, wih)
        if g_iv is not None:
            g_iv = g_iv.reshape(D, n * dv).to(input_value.dtype)
        if g_wih is not None:
            g_wih = g_wih.reshape(K, n * dv, GH).to(weight_ih.dtype)
        return (g_keys, g_values, g_h0, g_c0 if ctx.has_c0 else None, g_iv, g_wih, None, g_wq,
                *g_rest, None, None, None, None, None)


def draw_seed() -> int:
    """One 62-bit dropout seed from PyTorch's default generator (reproducible under
    ``torch.manual_seed``)."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())


def rim_cpu_kv(keys: Tensor, values: Tensor, h0: Tensor, c0: Optional[Tensor],
               params: Mapping[str, Tensor], cfg: RimConfig, *, training: bool = False,
               seed: int = 0) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """One RIM layer over a sequence whose input elements come already projected: the C++ driver
    in its pre-projected mode (``rims_fast::rim_cpu_kv_fwd``/``_bwd``).

    This is :func:`rim_cpu` with ``keys = x input_key`` and ``values = x input_value`` computed by
    the caller; the cell's input term is ``(sum_m a~ v_m) weight_ih[k]`` (not folded). A BRIM layer
    calls it once per step, its sources' keys and values being per-step products of states.

    Args:
        keys: ``(T, B, M, n_in*d_k)``; values: ``(T, B, M, n_in*d_v)``, float32 or float64.
        h0, c0: ``(B, K, H)`` (``c0`` None for GRU), same dtype.
        params: the 9 parameters of :data:`KV_PARAM_NAMES` (others are ignored), same dtype.
        cfg: the layer's :class:`RimConfig`.
        training: dropout only when true (and its probability > 0).
        seed: the dropout stream's seed (see :func:`dropout_masks`); the caller draws it.

    Returns:
        ``out (T, B, K*H)``, ``h_n``, ``c_n`` (``None`` for GRU), ``masks (T, B, K)``;
        differentiable w.r.t. keys, values, state and the 9 parameters.
    """
    why = unavailable_reason(keys.device, keys.dtype)
    if why is not None:
        raise RuntimeError(why)
    lstm = cfg.cell == "lstm"
    weights = [params[n] for n in KV_PARAM_NAMES]
    p_in = cfg.input_dropout if training else 0.0
    p_c = cfg.comm_dropout if training else 0.0
    leaves = [keys, values, h0, c0, *weights]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
    out, h_n, c_n, masks = torch.ops.rims_fast.rim_cpu_kv_fwd(
        keys, values, h0, c0 if lstm else None, *weights, cfg.top_k, cfg.input_heads,
        cfg.comm_heads, p_in, p_c, seed, cfg.block_inactive_grad, save)[:4]
    return out, h_n, (c_n if lstm else None), masks


def dropout_masks(seed: int, T: int, B: int, M: int, cfg: RimConfig, training: bool = True
                  ) -> tuple[Tensor, Tensor]:
    """The keep-masks the driver uses with ``seed``: ``(T, B, K, n_in, M)`` and
    ``(T, B, K, n_c, K)`` bool, ``rim_ref``'s ``dropout_masks`` layout."""
    p_in = cfg.input_dropout if training else 0.0
    p_c = cfg.comm_dropout if training else 0.0
    return torch.ops.rims_fast.rim_cpu_dropout_masks(seed, T, B, cfg.num_units, cfg.input_heads,
                                                      M, cfg.comm_heads, p_in, p_c)


# ---- fake impls and autograd -------------------------------------------------------------

def _register() -> None:
    lib = "rims_fast::"

    @torch.library.register_fake(lib + "rim_cpu_dropout_masks")
    def _(seed, T, B, K, input_heads, M, comm_heads, input_dropout, comm_dropout):
        return (torch.empty((T, B, K, input_heads, M), dtype=torch.bool),
                torch.empty((T, B, K, comm_heads, K), dtype=torch.bool))

    @torch.library.register_fake(lib + "rim_cpu_kv_fwd")
    def _(keys, values, h0, c0, input_query, weight_ih, weight_hh, bias_ih, bias_hh, comm_query,
          comm_key, comm_value, comm_output, top_k, input_heads, comm_heads, input_dropout,
          comm_dropout, seed, block_inactive_grad, save):
        T, B, M, nk = keys.shape
        K, H, GH = weight_hh.shape
        lstm = GH == 4 * H
        ck, cv = comm_query.shape[-1], comm_value.shape[-1]
        new = keys.new_empty
        out = [new((T, B, K * H)), new((B, K, H)), new((B, K, H) if lstm else (0,)),
               keys.new_empty((T, B, K), dtype=torch.bool)]
        if not save:
            return (*out, *[new((0,)) for _ in range(8)])
        return (*out, new((T, B, K, H) if lstm else (0,)), new((T, B, K, H)), new((T, B, K, nk)),
                new((T, B, K, input_heads, M)), new((T, B, K, GH if lstm else 2 * GH)),
                new((T, B, K, 2 * ck + cv)), new((T, B, K, comm_heads, K)), new((T, B, K, cv)))

    @torch.library.register_fake(lib + "rim_cpu_kv_bwd")
    def _(grad_out, grad_h_n, grad_c_n, keys, values, h0, c0, *rest):
        weights = rest[:9]
        factors = len(rest) > 26 and rest[26]  # after the 9 weights, 10 saved, 7 sizes/options
        grads = [keys.new_empty(keys.shape), values.new_empty(values.shape),
                 h0.new_empty(h0.shape),
                 c0.new_empty(c0.shape) if c0 is not None else keys.new_empty((0,))]
        T, B = keys.shape[:2]
        K, GH = weights[1].shape[0], weights[1].shape[2]
        extra = ((keys.new_empty((T, B, K, values.shape[-1])), keys.new_empty((T, B, K, GH)))
                 if factors
                 else (keys.new_empty((0,)), keys.new_empty((0,))))
        return (*grads, *[w.new_empty(w.shape) for w in weights], *extra)

    def kv_setup_context(ctx, inputs, output):
        (keys, values, h0, c0, *rest) = inputs
        weights, (top_k, n_in, n_c, p_in, p_c, seed, block, save) = rest[:9], rest[9:]
        ctx.cfg = (top_k, n_in, n_c, p_in, p_c, seed, block)
        # Gradients of unused outputs (masks, the saved activations) stay None instead of being
        # materialised as zeros of the saved tensors' sizes; rim_cpu_kv_bwd takes None for any.
        ctx.set_materialize_grads(False)
        ctx.has_c0 = c0 is not None
        ctx.saved_ok = save
        out, _h_n, _c_n, masks, *saved = output
        ctx.save_for_backward(keys, values, h0, c0, *weights, out, masks, *saved)

    def kv_backward(ctx, grad_out, grad_h_n, grad_c_n, *_unused):
        if torch.is_grad_enabled():  # create_graph: the backward op has no gradient of its own
            raise RuntimeError("rims_fast::rim_cpu_kv_fwd supports one backward, not double "
                               "backward (create_graph=True)")
        if not ctx.saved_ok:
            raise RuntimeError("rims_fast::rim_cpu_kv_fwd ran with save=False (no input required "
                               "grad when it ran), so it cannot be differentiated")
        keys, values, h0, c0, *rest = ctx.saved_tensors
        weights, out, masks, saved = rest[:9], rest[9], rest[10], rest[11:]
        grads = torch.ops.rims_fast.rim_cpu_kv_bwd(
            grad_out, grad_h_n, grad_c_n if ctx.has_c0 else None, keys, values, h0, c0, *weights,
            out, masks, *saved, *ctx.cfg)
        gk, gv, gh0, gc0, *gw = grads[:13]
        return (gk, gv, gh0, gc0 if ctx.has_c0 else None, *gw, *([None] * 8))

    torch.library.register_autograd(lib + "rim_cpu_kv_fwd", kv_backward,
                                    setup_context=kv_setup_context)


if _op_registered() is None:
    _register()
