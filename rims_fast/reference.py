"""The executable spec: one RIM layer over a sequence, in plain PyTorch.

Every backend is tested against :func:`rim_ref`. It follows SPEC.md step by step (the step numbers
are in the comments), is vectorized over batch and mechanisms (the only Python loop is over time),
never synchronises with the host, and builds no tensor on the host inside the loop.

Layout: internally the state is mechanism-major, ``(K, B, H)``, so that every per-mechanism
projection is one ``bmm`` with the K mechanisms as the batch.

Precision: products run on operands rounded to the input dtype (``_Rounder``) and accumulate in the
compute dtype (float32, or float64 for float64 inputs); softmax, ``p``, the rank, the gates and the
carried ``h``/``c`` stay in the compute dtype; only ``out``, ``h_n`` and ``c_n`` are rounded.
In float32/float64 the rounding is the identity.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._config import RimConfig

__all__ = ["rim_ref", "brim_ref", "rim_step", "select_active", "null_softmax", "lstm_cell_ref", "gru_cell_ref", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Rounder:
    """Rounds an activation to the storage dtype before it enters a product (tensor-core model)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.identity = compute_dtype(dtype) == dtype

    def __call__(self, t: Tensor) -> Tensor:
        return t if self.identity else t.to(self.dtype).to(t.dtype)


def null_softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over ``{null, s_1..s_M}`` along the last dim, the null having score 0 (SPEC step 1).

    Returns ``(a, a_null)``: the probabilities of the real elements, shape of ``s``, and of the
    null, shape ``s.shape[:-1]``. The shift ``mu = max(0, max_m s)`` is SPEC step 2's, so
    ``a_null`` is bit-for-bit the value the competition ranks. The shift carries no gradient
    (softmax does not depend on it).
    """
    mu = s.detach().amax(-1, keepdim=True).clamp_min(0.0)
    e = torch.exp(s - mu)
    e_null = torch.exp(-mu)
    denom = e_null + e.sum(-1, keepdim=True)
    return e / denom, (e_null / denom).squeeze(-1)


def select_active(p: Tensor, top_k: int, lower: Tensor) -> Tensor:
    """SPEC step 2: ``k`` is active iff ``#{j : p_j < p_k or (p_j == p_k and j < k)} < top_k``.

    ``p``: ``(K, B)``; ``lower``: ``(K, K)`` bool, ``lower[k, j] = j < k`` (built once by the
    caller). A pure comparison count: no sort, so no dependence on a sort's tie order.
    """
    pk, pj = p.unsqueeze(1), p.unsqueeze(0)  # (K, 1, B) and (1, K, B): [k, j, b]
    beats = (pj < pk) | ((pj == pk) & lower.unsqueeze(-1))
    return beats.sum(1) < top_k  # (K, B)


def lstm_cell_ref(gates: Tensor, h: Tensor, c: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """SPEC step 3, LSTM: ``nn.LSTMCell`` on active rows (ATen's order of operations), exact copy
    of ``(h, c)`` on the rest.

    ``gates``: ``(..., 4H)`` pre-activations (both terms and both biases), order ``(i, f, g, o)``;
    ``h``, ``c``: ``(..., H)``; ``mask``: ``(...)`` bool.
    """
    i, f, g, o = gates.chunk(4, -1)
    c_cell = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_cell = torch.sigmoid(o) * torch.tanh(c_cell)
    m = mask.unsqueeze(-1)
    return torch.where(m, h_cell, h), torch.where(m, c_cell, c)


def gru_cell_ref(gi: Tensor, gh: Tensor, h: Tensor, mask: Tensor) -> Tensor:
    """SPEC step 3, GRU: ``nn.GRUCell`` on active rows (``gi``/``gh`` include their biases, gate
    order ``(r, z, n)``), exact copy of ``h`` on the rest."""
    ir, iz, in_ = gi.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r = torch.sigmoid(ir + hr)
    z = torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    h_cell = n + z * (h - n)  # = (1 - z) n + z h, in ATen's GRUCell order of operations
    return torch.where(mask.unsqueeze(-1), h_cell, h)


def _dropout(a: Tensor, p: float, training: bool, keep: Optional[Tensor] = None) -> Tensor:
    """Inverted dropout on attention probabilities, no renormalisation (SPEC "Dropout").
    ``keep``: a given bool keep-mask (another backend's draw), else drawn from torch's generator."""
    if not training or p == 0.0:
        return a
    if keep is None:  # contiguous, so the draw's order is the logical (row-major) order
        keep = torch.empty(a.shape, dtype=a.dtype, device=a.device).bernoulli_(1.0 - p)
    return a * keep / (1.0 - p)


def _bmm(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Per-mechanism product: ``x (K, B, I) @ w (K, I, O) [+ bias (K, O)]`` -> ``(K, B, O)``."""
    if bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(bias.unsqueeze(1), x, w)


class _InputGates:
    """The cell's input term ``u_k weight_ih[k] + bias_ih[k]`` of every step, for all mechanisms.

    The attention read is linear in the probabilities, so
    ``u_k W_ih[k] = sum_{n,m} a_{k,n,m} (X_m input_value_n W_ih[k]_n)``, where ``W_ih[k]_n`` is
    the row block of head ``n``. When ``M * D <= d_v`` it is cheaper to fold ``input_value_n
    W_ih[k]_n`` into one ``(D, G*H)`` matrix and project all steps up front ("folded"); otherwise
    the values of all steps are projected up front and ``u_k W_ih[k]`` is one bmm per step.
    Both are the same sum, reassociated.
    """

    def __init__(self, x: Tensor, P: Mapping[str, Tensor], cfg: RimConfig, rnd: _Rounder):
        T, B, M, D = x.shape
        n, dv, K = cfg.input_heads, cfg.input_value_size, cfg.num_units
        self.bias = P["bias_ih"]
        self.folded = M * D <= dv
        if self.folded:
            w_ih = P["weight_ih"].view(K, n, dv, -1)
            w_v = P["input_value"].view(D, n, dv)
            fold = rnd(torch.einsum("dnv,knvg->kndg", w_v, w_ih))  # (K, n, D, GH)
            xw = torch.einsum("tbmd,kndg->tkbnmg", x, fold)  # (T, K, B, n, M, GH)
            self.steps = xw.unbind(0)  # unbind: one stack in backward, not T full-size zeros
        else:
            self.w_ih = P["weight_ih"]
            self.steps = (x @ P["input_value"]).view(T, B, M, n, dv).unbind(0)
        self.rnd = rnd

    def __call__(self, t: int, a: Tensor) -> Tensor:
        """``a``: ``(K, B, n, M)`` attention probabilities of step ``t`` -> ``(K, B, G*H)``."""
        if self.folded:
            return torch.einsum("kbnm,kbnmg->kbg", self.rnd(a), self.steps[t]) + self.bias.unsqueeze(1)
        u = torch.einsum("kbnm,bmnv->kbnv", self.rnd(a), self.rnd(self.steps[t]))
        return _bmm(self.rnd(u.flatten(2)), self.w_ih, self.bias)


def rim_step(h: Tensor, c: Optional[Tensor], keys: Tensor, input_term: Callable[[Tensor], Tensor],
             P: Mapping[str, Tensor], cfg: RimConfig, rnd: _Rounder, lower: Tensor,
             mask: Optional[Tensor], training: bool, lstm_cell: Callable = lstm_cell_ref,
             gru_cell: Callable = gru_cell_ref,
             keep: tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
             ) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """SPEC steps 1-5 for one time step, mechanism-major.

    ``h``, ``c``: ``(K, B, H)`` in the compute dtype (``c`` None for GRU); ``keys``:
    ``(B, M, n_in, d_k)`` keys of this step's input elements; ``input_term(a)`` maps the attention
    probabilities ``(K, B, n_in, M)`` to the cell's input term ``(K, B, G*H)`` (bias included);
    ``P``: parameters in the compute dtype; ``mask``: ``(K, B)`` to impose a selection, or None;
    ``keep``: given dropout keep-masks ``(K, B, n_in, M)`` and ``(K, B, n_c, K)``, or None to draw.
    Returns the new ``h``, ``c`` and the ``(K, B)`` mask of active mechanisms.
    """
    K, B, _ = h.shape
    n_in, d_k = cfg.input_heads, cfg.input_key_size
    n_c, d_c, d_cv = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    # 1. Input attention: per-mechanism query, scores against the M elements and the null.
    q = _bmm(rnd(h), P["input_query"]).view(K, B, n_in, d_k)
    s = torch.einsum("kbnd,bmnd->kbnm", rnd(q), rnd(keys)) * (1.0 / math.sqrt(d_k))
    a, a_null = null_softmax(s)
    # 2. Competition on p_k = mean over heads of the null's probability (undropped).
    if mask is None:
        mask = select_active(a_null.detach().mean(-1), cfg.top_k, lower)
    a = _dropout(a, cfg.input_dropout, training, keep[0])
    # 3. Independent dynamics: active mechanisms step their cell, inactive ones copy.
    gi = input_term(a)
    gh = _bmm(rnd(h), P["weight_hh"], P["bias_hh"])
    if cfg.cell == "lstm":
        h_t, c = lstm_cell(gi + gh, h, c, mask)
    else:
        h_t = gru_cell(gi, gh, h, mask)
    # 4. Communication: all mechanisms offer keys/values, active ones read (residual).
    m3 = mask.unsqueeze(-1)
    h_kv = torch.where(m3, h_t, h_t.detach()) if cfg.block_inactive_grad else h_t
    qc = _bmm(rnd(h_t), P["comm_query"]).view(K, B, n_c, d_c)
    kc = _bmm(rnd(h_kv), P["comm_key"]).view(K, B, n_c, d_c)
    vc = _bmm(rnd(h_kv), P["comm_value"]).view(K, B, n_c, d_cv)
    scores = torch.einsum("kbnd,jbnd->kbnj", rnd(qc), rnd(kc)) * (1.0 / math.sqrt(d_c))
    b = _dropout(torch.softmax(scores, dim=-1), cfg.comm_dropout, training, keep[1])
    o = torch.einsum("kbnj,jbnd->kbnd", rnd(b), rnd(vc)).reshape(K, B, n_c * d_cv)
    # 5. New state: h' (residual for active mechanisms), c from the cell.
    return torch.where(m3, h_t + _bmm(rnd(o), P["comm_output"]), h_t), c, mask


def rim_ref(
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    params: Mapping[str, Tensor],
    cfg: RimConfig,
    *,
    masks: Optional[Tensor] = None,
    training: bool = False,
    lstm_cell: Callable = lstm_cell_ref,
    gru_cell: Callable = gru_cell_ref,
    dropout_masks: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """One RIM layer over a sequence, exactly SPEC.md.

    Args:
        x: ``(T, B, M, D)`` input elements, time-major.
        h0, c0: ``(B, K, H)`` initial state (``c0`` is ``None`` for GRU).
        params: the layer's parameters by SPEC name (``RIM.named_parameters()``).
        cfg: the layer's :class:`RimConfig`.
        masks: optional ``(T, B, K)`` bool; replaces the competition (to compare backends under
            identical selections). Must have exactly ``top_k`` true per row for SPEC semantics;
            that count is not checked (it would cost a device sync), shape and dtype are.
        training: dropout is applied only when true.
        lstm_cell, gru_cell: the masked cell update (step 3); backends substitute a fused op with
            the same signature as :func:`lstm_cell_ref` / :func:`gru_cell_ref`.
        dropout_masks: optional bool keep-masks ``(T, B, K, n_in, M)`` for the input attention
            and ``(T, B, K, n_c, K)`` for the communication, used instead of drawing (in training
            mode with ``p > 0``), so a backend's own dropout draw can be replayed exactly; either
            may be ``None`` (drawn).

    Returns:
        ``out (T, B, K*H)``, ``h_n (B, K, H)``, ``c_n (B, K, H)`` or ``None``, ``masks (T, B, K)``.

    Raises ``TypeError``/``ValueError`` for bad ``x``, ``h0``/``c0`` or ``masks``, as the modules do.
    """
    from .modules import check_input, check_masks  # modules imports this module (via _backend)

    check_input(x, (4, 4), cfg.input_size, params["input_key"])
    _check_given_state(h0, c0, x, cfg)
    check_masks(masks, x, (x.shape[0], x.shape[1], cfg.num_units))
    T, B, M, D = x.shape
    K, H = cfg.num_units, cfg.hidden_size
    ct = compute_dtype(x.dtype)
    rnd = _Rounder(x.dtype)
    P = {name: p.to(ct) for name, p in params.items()}
    x = x.to(ct)

    # State-independent work for all steps, before the loop: input keys and the cell's input term.
    keys = (x @ P["input_key"]).view(T, B, M, cfg.input_heads, cfg.input_key_size).unbind(0)
    input_gates = _InputGates(x, P, cfg, rnd)
    given = masks.permute(0, 2, 1).unbind(0) if masks is not None else [None] * T  # (K, B) each
    lower = lower_triangle(K, x.device)
    keeps = [(None, None)] * T
    if dropout_masks is not None:  # (T, B, K, n, .) -> per step (K, B, n, .); None: draw
        keeps = list(zip(*(m.transpose(1, 2).unbind(0) if m is not None else [None] * T
                           for m in dropout_masks)))

    h = h0.to(ct).transpose(0, 1)  # (K, B, H), carried in the compute dtype between steps
    c = c0.to(ct).transpose(0, 1) if c0 is not None else None
    outs, selected = [], []
    for t in range(T):
        h, c, mask = rim_step(h, c, keys[t], functools.partial(input_gates, t), P, cfg, rnd, lower,
                              given[t], training, lstm_cell, gru_cell, keeps[t])
        outs.append(h)
        selected.append(mask)
    dtype = params["input_key"].dtype
    out = torch.stack(outs).permute(0, 2, 1, 3).reshape(T, B, K * H).to(dtype)
    return (out, *finish_state(h, c, dtype), torch.stack(selected).transpose(1, 2).contiguous())


def _check_given_state(h0: Optional[Tensor], c0: Optional[Tensor], x: Tensor, cfg: RimConfig,
                       where: str = "") -> None:
    """The references have no default state: ``h0`` (and ``c0`` for LSTM) must be given, then are
    checked as the modules check a state. ``where`` prefixes names, as in ``check_state``."""
    from .modules import check_state

    lstm = cfg.cell == "lstm"
    if h0 is None or (lstm and c0 is None):
        raise TypeError(f"{where}h0{' and ' + where + 'c0' if lstm else ''} must be given: the "
                        "reference has no default state (pass zeros of shape (B, K, H))")
    check_state((h0, c0) if lstm else h0, x, (x.shape[1], cfg.num_units, cfg.hidden_size), lstm,
                where)


def _check_brim_args(x: Tensor, states: Sequence, layer_params: Sequence, cfgs: Sequence[RimConfig],
                     masks: Optional[Sequence[Optional[Tensor]]]) -> None:
    """:func:`brim_ref`'s arguments, with BRIM's call-time checks and messages."""
    from .modules import check_input, check_masks

    L = len(cfgs)
    for name, seq in (("states", states), ("layer_params", layer_params), ("masks", masks)):
        if seq is not None and (not isinstance(seq, (list, tuple)) or len(seq) != L):
            raise TypeError(f"{name} must be a list of {L} per-layer entries (one per cfg)")
    check_input(x, (4, 4), cfgs[0].input_size, layer_params[0]["input_key_bottom_up"])
    for l, cfg in enumerate(cfgs):
        if not (isinstance(states[l], (tuple, list)) and len(states[l]) == 2):
            raise TypeError(f"states[{l}] must be a pair (h0, c0) (c0 None for cell='gru')")
        _check_given_state(*states[l], x, cfg, f"states[{l}].")
        check_masks(None if masks is None else masks[l], x,
                    (x.shape[0], x.shape[1], cfg.num_units), f"masks[{l}]")


def lower_triangle(K: int, device) -> Tensor:
    """``lower[k, j] = j < k``: the tie-break operand of :func:`select_active`, built once."""
    return torch.ones(K, K, dtype=torch.bool, device=device).tril(-1)


def finish_state(h: Tensor, c: Optional[Tensor], dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """Mechanism-major compute-dtype state -> ``(B, K, H)`` ``h_n``, ``c_n`` in the storage dtype."""
    h_n = h.transpose(0, 1).contiguous().to(dtype)
    return h_n, (c.transpose(0, 1).contiguous().to(dtype) if c is not None else None)


def brim_ref(
    x: Tensor,
    states: Sequence[tuple[Tensor, Optional[Tensor]]],
    layer_params: Sequence[Mapping[str, Tensor]],
    cfgs: Sequence[RimConfig],
    *,
    masks: Optional[Sequence[Tensor]] = None,
    training: bool = False,
    lstm_cell: Callable = lstm_cell_ref,
    gru_cell: Callable = gru_cell_ref,
    dropout_masks: Optional[Sequence[Optional[tuple[Optional[Tensor], Optional[Tensor]]]]] = None,
) -> tuple[list[Tensor], list[tuple[Tensor, Optional[Tensor]]], list[Tensor]]:
    """A BRIM stack over a sequence, exactly SPEC.md "Multi-layer: BRIM".

    Layer ``l`` attends over ``{null, bottom-up elements, top-down element}``: bottom-up is
    ``x_t``'s ``M`` elements for ``l = 0`` and layer ``l-1``'s new ``h_t`` (one element,
    mechanism-major) above; top-down, for every layer but the last, is layer ``l+1``'s
    ``h_{t-1}``. Layers update bottom to top; the rest is :func:`rim_step`.

    Args:
        x: ``(T, B, M, D)``.
        states: per layer ``(h0, c0)``, each ``(B, K_l, H_l)`` (``c0`` None for GRU).
        layer_params: per layer, the RIM parameters with ``input_key``/``input_value`` replaced by
            ``input_key_bottom_up``/``input_value_bottom_up`` and, below the top,
            ``input_key_top_down``/``input_value_top_down``.
        cfgs: per layer :class:`RimConfig` (its ``input_size`` is the bottom-up width).
        masks: optional per-layer ``(T, B, K_l)`` bool selections to impose (``top_k_l`` true
            per row; the count is not checked, shape and dtype are).
        dropout_masks: optional per-layer pairs of bool keep-masks ``(T, B, K_l, n_in, M_l)``
            (``M_l`` = the layer's input elements: its bottom-up ones, then the top-down one) and
            ``(T, B, K_l, n_c, K_l)``, as :func:`rim_ref`'s, to replay a backend's dropout draw;
            ``None`` entries are drawn.

    Returns:
        per-layer outputs ``(T, B, K_l*H_l)``, per-layer final ``(h_n, c_n)``, per-layer masks.

    Raises ``TypeError``/``ValueError`` for bad ``x``, ``states`` or ``masks``, as ``BRIM`` does.
    """
    _check_brim_args(x, states, layer_params, cfgs, masks)
    T, B, M, D = x.shape
    L = len(cfgs)
    ct = compute_dtype(x.dtype)
    rnd = _Rounder(x.dtype)
    dtype = x.dtype
    P = [{name: p.to(ct) for name, p in lp.items()} for lp in layer_params]
    x = x.to(ct)
    # Layer 0's bottom-up source does not depend on the state: project all steps up front.
    keys0 = (x @ P[0]["input_key_bottom_up"]).unbind(0)
    vals0 = (x @ P[0]["input_value_bottom_up"]).unbind(0)
    h = [s[0].to(ct).transpose(0, 1) for s in states]
    c = [s[1].to(ct).transpose(0, 1) if s[1] is not None else None for s in states]
    lowers = [lower_triangle(cfg.num_units, x.device) for cfg in cfgs]
    given = [m.permute(0, 2, 1).unbind(0) if m is not None else [None] * T
             for m in (masks if masks is not None else [None] * L)]
    outs = [[] for _ in range(L)]
    selected = [[] for _ in range(L)]
    keeps = [[(None, None)] * T for _ in range(L)]  # per layer, per step (K, B, n, .) or None
    for l, pair in enumerate(dropout_masks if dropout_masks is not None else []):
        if pair is not None:
            keeps[l] = list(zip(*(m.transpose(1, 2).unbind(0) if m is not None else [None] * T
                                  for m in pair)))

    def flat(state: Tensor) -> Tensor:  # (K, B, H) -> one element (B, 1, K*H), mechanism-major
        return rnd(state.transpose(0, 1).reshape(B, 1, -1))

    for t in range(T):
        h_prev = list(h)  # every layer's h_{t-1}, before this step updates any of them
        for l, cfg in enumerate(cfgs):
            n, dk, dv = cfg.input_heads, cfg.input_key_size, cfg.input_value_size
            if l == 0:
                keys, vals = [keys0[t]], [vals0[t]]
            else:
                below = flat(h[l - 1])  # layer l-1 after this step's communication, not masked
                keys = [below @ P[l]["input_key_bottom_up"]]
                vals = [below @ P[l]["input_value_bottom_up"]]
            if l < L - 1:
                above = flat(h_prev[l + 1])
                keys.append(above @ P[l]["input_key_top_down"])
                vals.append(above @ P[l]["input_value_top_down"])
            k_t = torch.cat(keys, 1).view(B, -1, n, dk)
            v_t = torch.cat(vals, 1).view(B, -1, n, dv)

            def input_term(a, v_t=v_t, Pl=P[l]):
                u = torch.einsum("kbnm,bmnv->kbnv", rnd(a), rnd(v_t)).flatten(2)
                return _bmm(rnd(u), Pl["weight_ih"], Pl["bias_ih"])

            h[l], c[l], mask = rim_step(h[l], c[l], k_t, input_term, P[l], cfg, rnd, lowers[l],
                                        given[l][t], training, lstm_cell, gru_cell, keeps[l][t])
            outs[l].append(h[l])
            selected[l].append(mask)

    out = [torch.stack(o).permute(0, 2, 1, 3).reshape(T, B, -1).to(dtype) for o in outs]
    final = [finish_state(h[l], c[l], dtype) for l in range(L)]
    return out, final, [torch.stack(s).transpose(1, 2).contiguous() for s in selected]
