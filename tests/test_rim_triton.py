"""backend="triton" against the float64 reference: outputs, final states, masks, every gradient.

On a machine without CUDA the kernels run on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before triton is imported), so shapes are tiny and the
grid is a hand-picked sub-grid of the parameter product (the interpreter costs ~1 s per step).
The ``gpu`` class runs realistic shapes and is skipped without CUDA.

The backward is tested both ways (``RIMS_FAST_TRITON_BWD``): the default ``recompute`` by the
tests above the "Triton backward kernels" section, ``kernels`` (triton_kernels/rim_step_bwd.py) by
the ``*bwd_kernels*`` tests, which also assert that the backward kernels were launched.

Masks are compared exactly with the competition recomputed in float64 on the reference's states,
except in rows where the ``top_k``-th and ``(top_k+1)``-th smallest ``p`` differ by at most
``1e-6 * max p`` (SPEC.md); values are always compared under the backend's own masks.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close, make_rim

import rims_fast
from rims_fast._backend import unavailable_reason as backend_unavailable_reason
from rims_fast.reference import null_softmax, rim_ref, select_active

pytestmark = pytest.mark.triton

rt = pytest.importorskip("rims_fast.rim_triton")

if rt.unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                         torch.float32) is not None:
    pytest.skip(rt.unavailable_reason(torch.device("cpu"), torch.float32), allow_module_level=True)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = rt.PARAM_NAMES

# Relative gap under which a row counts as a near-tie for the mask comparison (SPEC: 1e-6 for
# float32). In bfloat16 every product operand carries 8 bits, so p itself is only good to ~1e-2.
TIE_GAP = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _inputs(rim, T, B, M, dtype, zero_state, noncontig, seed=3):
    g = torch.Generator().manual_seed(seed)
    K, H, D = rim.num_units, rim.hidden_size, rim.input_size
    if noncontig:  # (B, T, M, 2D) sliced and transposed: neither contiguous nor dense
        x = torch.randn(B, T, M, 2 * D, generator=g, dtype=torch.float64)[..., ::2].transpose(0, 1)
    else:
        x = torch.randn(T, B, M, D, generator=g, dtype=torch.float64)
    if zero_state:
        h0, c0 = torch.zeros(B, K, H, dtype=torch.float64), torch.zeros(B, K, H, dtype=torch.float64)
    else:
        h0, c0 = (torch.randn(B, K, H, generator=g, dtype=torch.float64),
                  torch.randn(B, K, H, generator=g, dtype=torch.float64))
    if rim.cell != "lstm":
        c0 = None
    cast = lambda t: None if t is None else t.to(DEV, dtype)
    return cast(x), cast(h0), cast(c0)


def _loss_weights(T, B, K, H, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in ((T, B, K * H), (B, K, H), (B, K, H))]


def _run(fn, x, h0, c0, params, cfg, weights, **kw):
    """Run ``fn`` (rim_triton or rim_ref), differentiate a weighted sum of all outputs."""
    leaves = {"x": x.detach().requires_grad_(), "h0": h0.detach().requires_grad_()}
    if c0 is not None:
        leaves["c0"] = c0.detach().requires_grad_()
    ps = {n: p.detach().requires_grad_() for n, p in params.items()}
    out, h_n, c_n, masks = fn(leaves["x"], leaves["h0"], leaves.get("c0"), ps, cfg, **kw)
    wo, wh, wc = (w.to(out.device, out.dtype) for w in weights)
    loss = (out * wo).sum() + (h_n * wh).sum()
    if c_n is not None:
        loss = loss + (c_n * wc).sum()
    allv = {**leaves, **ps}
    grads = dict(zip(allv, torch.autograd.grad(loss, list(allv.values()))))
    return {"out": out, "h_n": h_n, "c_n": c_n}, grads, masks


def _p_under(x, h0, out, params, cfg):
    """``p`` (T, B, K) in float64 at the reference's states (SPEC step 2)."""
    T, B, M, D = x.shape
    K, H, n, dk = cfg.num_units, cfg.hidden_size, cfg.input_heads, cfg.input_key_size
    prev = torch.cat([h0.reshape(1, B, K * H), out[:-1]]).view(T, B, K, H)
    keys = (x @ params["input_key"]).view(T, B, M, n, dk)
    q = torch.einsum("tbkh,khe->tbke", prev, params["input_query"]).view(T, B, K, n, dk)
    s = torch.einsum("tbknd,tbmnd->tbknm", q, keys) / math.sqrt(dk)
    return null_softmax(s)[1].mean(-1)


def _check_masks(masks, p, top_k, gap):
    """Exact mask equality with the float64 competition, except near-tie rows (SPEC.md)."""
    masks, p = masks.cpu(), p.cpu()
    T, B, K = masks.shape
    lower = torch.ones(K, K, dtype=torch.bool).tril(-1)
    own = select_active(p.reshape(T * B, K).t(), top_k, lower).t().reshape(T, B, K)
    assert (masks.sum(-1) == top_k).all(), "every row must have exactly top_k active mechanisms"
    if top_k == K:
        return 0
    srt = p.sort(-1).values
    tie = (srt[..., top_k] - srt[..., top_k - 1]) <= gap * p.amax(-1)
    bad = (own != masks.cpu()).any(-1) & ~tie
    assert not bad.any(), f"masks differ from the float64 competition in rows {bad.nonzero().tolist()}"
    return int(tie.sum())


def _compare(cell, T, B, M, K, top_k, H, n_in, n_c, zero_state, noncontig, dtype,
             sizes=None, seed=0):
    kw = dict(input_size=5, input_key_size=4, input_value_size=3, comm_key_size=3,
              comm_value_size=2)
    kw.update(sizes or {})
    rim = make_rim(seed=seed, dtype=torch.float64, cell=cell, hidden_size=H, num_units=K,
                   top_k=top_k, input_heads=n_in, comm_heads=n_c, **kw)
    cfg = rim.config
    p64 = {n: p.detach() for n, p in rim.named_parameters()}
    pk = {n: p.to(DEV, dtype) for n, p in p64.items()}
    x, h0, c0 = _inputs(rim, T, B, M, dtype, zero_state, noncontig)
    w = _loss_weights(T, B, K, H)
    vals, grads, masks = _run(rt.rim_triton, x, h0, c0, pk, cfg, w, training=False)
    assert masks.dtype == torch.bool and masks.shape == (T, B, K)
    assert vals["out"].dtype == dtype and vals["out"].shape == (T, B, K * H)
    d = lambda t: None if t is None else t.detach().cpu().double()
    rvals, rgrads, _ = _run(rim_ref, d(x), d(h0), d(c0), p64, cfg, w, masks=masks.cpu())
    for name in ("out", "h_n", "c_n"):
        if rvals[name] is None:
            assert vals[name] is None
            continue
        assert_close(name, vals[name], rvals[name], dtype, "out")
    for name, g in rgrads.items():
        assert_close(f"grad_{name}", grads[name], g, dtype,
                     "grad_in" if name in ("x", "h0", "c0") else "grad_w")
    p = _p_under(d(x), d(h0), rvals["out"].detach(), p64, cfg)
    ties = _check_masks(masks.cpu(), p, top_k, TIE_GAP[dtype])
    if zero_state:  # exact ties at t = 0 (p = 1/(M+1) for all k) go to the lower index
        first = torch.arange(K) < top_k
        assert (masks[0].cpu() == first).all()
    print(f"near-tie rows: {ties}")


# (cell, T, B, M, K, top_k, H, n_in, n_c, zero_state, noncontig): a sub-grid that covers every
# axis value (LSTM/GRU, M 1/3, heads 1/2, top_k 1/K, T 1/3, H odd and a power of two, zero/given
# state, contiguous/not) at least once per cell within the interpreter's budget.
GRID = [
    ("lstm", 3, 3, 1, 4, 1, 5, 1, 1, False, False),
    ("lstm", 3, 2, 3, 4, 2, 5, 2, 2, True, True),
    ("lstm", 1, 3, 3, 3, 3, 3, 1, 2, False, True),
    ("lstm", 3, 2, 1, 3, 1, 8, 2, 1, True, False),
    ("gru", 3, 3, 1, 4, 1, 5, 1, 1, False, True),
    ("gru", 3, 2, 3, 4, 2, 5, 2, 2, True, False),
    ("gru", 1, 3, 3, 3, 3, 3, 2, 1, False, False),
    ("gru", 3, 2, 1, 3, 1, 8, 1, 2, True, True),
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_fp32(case):
    _compare(*case, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_matches_reference_half(cell, dtype):
    # Looser documented tolerances: TOL[bfloat16 / float16] of tests/helpers.py (8 / 11-bit
    # operands).
    _compare(cell, 3, 3, 3, 4, 2, 5, 2, 2, False, True, dtype=dtype)


def test_two_sample_tiles():
    """B > BLOCK_B: several programs along the batch, the last one partial."""
    _compare("lstm", 2, 17, 2, 3, 2, 5, 1, 2, False, False, dtype=torch.float32)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_same_masks_in_backward(cell):
    """Training with dropout: the Triton forward equals the float64 recompute under the keep-masks
    regenerated from the same stream, gradients included; the stream follows torch.manual_seed."""
    rim = make_rim(seed=1, dtype=torch.float64, cell=cell, hidden_size=5, num_units=3, top_k=2,
                   input_heads=2, comm_heads=2, input_dropout=0.3, comm_dropout=0.4)
    cfg = rim.config
    T, B, M = 2, 3, 2
    p64 = {n: p.detach() for n, p in rim.named_parameters()}
    pk = {n: p.to(DEV, torch.float32) for n, p in p64.items()}
    x, h0, c0 = _inputs(rim, T, B, M, torch.float32, False, False)
    w = _loss_weights(T, B, 3, 5)
    torch.manual_seed(11)
    vals, grads, masks = _run(rt.rim_triton, x, h0, c0, pk, cfg, w, training=True)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2 ** 31 - 2, (1,)).item())
    keep_in, keep_c = rt._dropout_keep(cfg, T, B, M, seed, DEV)
    assert 0 < keep_in.float().mean() < 1 and 0 < keep_c.float().mean() < 1
    d = lambda t: None if t is None else t.detach().cpu().double()
    rvals, rgrads, _ = _run(rim_ref, d(x), d(h0), d(c0), p64, cfg, w, masks=masks.cpu(),
                            training=True, dropout_masks=(keep_in.cpu(), keep_c.cpu()))
    for name in ("out", "h_n", "c_n"):
        if rvals[name] is not None:
            assert_close(name, vals[name], rvals[name], torch.float32, "out")
    for name, g in rgrads.items():
        assert_close(f"grad_{name}", grads[name], g, torch.float32,
                     "grad_in" if name in ("x", "h0", "c0") else "grad_w")
    # Reproducible under torch.manual_seed; different from eval mode.
    torch.manual_seed(11)
    again = rt.rim_triton(x, h0, c0, pk, cfg, training=True)[0]
    assert torch.equal(again, vals["out"].detach())
    evalm = rt.rim_triton(x, h0, c0, pk, cfg, training=False)[0]
    assert not torch.equal(evalm, vals["out"].detach())


@pytest.mark.parametrize("fwd", ["fused", "tiled"])
def test_opcheck(monkeypatch, fwd):
    monkeypatch.setenv("RIMS_FAST_TRITON_FWD", fwd)
    rim = make_rim(seed=2, dtype=torch.float32, hidden_size=3, num_units=2, top_k=1,
                   input_heads=1, comm_heads=1)
    sizes, cell, p_in, p_c, big = rt._cfg_args(rim.config)
    x = torch.randn(1, 2, 1, 5, device=DEV)
    h0 = torch.randn(2, 2, 3, device=DEV, requires_grad=True)
    c0 = torch.randn(2, 2, 3, device=DEV, requires_grad=True)
    params = [dict(rim.named_parameters())[n].detach().to(DEV).requires_grad_() for n in NAMES]
    args = (x.requires_grad_(), h0, c0, params, sizes, cell, p_in, p_c, big, False, 0, False)
    # test_schema runs the op under a mutation-checking mode and test_aot_dispatch_dynamic traces
    # forward and backward: each a few interpreted runs of tiny shape.
    torch.library.opcheck(torch.ops.rims_fast.rim_triton_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_kernels_backward():
    """The op with ``save=True`` (its saved activations as extra outputs) and the Triton
    backward op ``rims_fast::rim_triton_bwd`` (fake impl, so aot/compile trace it as one node)."""
    rim = make_rim(seed=2, dtype=torch.float32, hidden_size=3, num_units=2, top_k=1,
                   input_heads=1, comm_heads=1)
    sizes, cell, p_in, p_c, big = rt._cfg_args(rim.config)
    x = torch.randn(1, 2, 1, 5, device=DEV, requires_grad=True)
    h0 = torch.randn(2, 2, 3, device=DEV, requires_grad=True)
    c0 = torch.randn(2, 2, 3, device=DEV, requires_grad=True)
    params = [dict(rim.named_parameters())[n].detach().to(DEV).requires_grad_() for n in NAMES]
    args = (x, h0, c0, params, sizes, cell, p_in, p_c, big, False, 0, True)
    torch.library.opcheck(torch.ops.rims_fast.rim_triton_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor", "test_aot_dispatch_dynamic"))
    res = rt.rim_triton_fwd(x.detach(), h0.detach(), c0.detach(), [q.detach() for q in params],
                            *args[4:])
    g = [torch.randn_like(res[0]), torch.randn_like(res[1]), torch.randn_like(res[2])]
    bargs = (*g, x.detach(), h0.detach(), c0.detach(), [q.detach() for q in params], res[3],
             list(res[4:]), sizes, cell, p_in, p_c, big, False, 0)
    torch.library.opcheck(torch.ops.rims_fast.rim_triton_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_unavailable_reason(monkeypatch):
    assert "float64" in rt.unavailable_reason(torch.device("cpu"), torch.float64)
    assert rt.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in rt.unavailable_reason(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert rt.unavailable_reason(torch.device("cpu"), torch.float16) is None
    assert backend_unavailable_reason("triton", DEV, torch.float32) is None


def test_module_backend_triton():
    """Through ``rims_fast.RIM(backend="triton")``: same as ``backend="torch"`` in float32."""
    torch.manual_seed(0)
    a = rims_fast.RIM(4, 5, 3, 2, input_heads=1, input_key_size=4, input_value_size=3,
                      comm_heads=1, comm_key_size=3, comm_value_size=2, backend="triton").to(DEV)
    b = rims_fast.RIM(4, 5, 3, 2, input_heads=1, input_key_size=4, input_value_size=3,
                      comm_heads=1, comm_key_size=3, comm_value_size=2, backend="torch").to(DEV)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 4, device=DEV)
    oa, (ha, ca), ma = a(x, return_masks=True)
    ob, (hb, cb), mb = b(x, return_masks=True)
    assert a.last_backend == "triton"
    assert torch.equal(ma, mb)
    assert_close("out", oa, ob, torch.float32)
    oa.sum().backward()
    ob.sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert_close(f"grad_{n}", pa.grad, pb.grad, torch.float32, "grad_w")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestGPU:
    """Realistic shapes on a GPU: B=64, T=20, D=64, K=6, top_k=4, H=100."""

    SHAPE = dict(T=20, B=64, M=1, K=6, top_k=4, H=100, D=64)
    # `large` (issue 5) with few steps: what the tiled forward is for.
    LARGE = dict(T=4, B=256, M=1, K=8, top_k=4, H=256, D=512)

    def _case(self, cell, dtype, s=None):
        s = s or self.SHAPE
        rim = make_rim(seed=0, dtype=torch.float64, cell=cell, input_size=s["D"],
                       hidden_size=s["H"], num_units=s["K"], top_k=s["top_k"], input_heads=1,
                       input_key_size=64, input_value_size=400, comm_heads=4, comm_key_size=32,
                       comm_value_size=32)
        cfg = rim.config
        p64 = {n: p.detach().cuda() for n, p in rim.named_parameters()}
        pk = {n: p.to(dtype) for n, p in p64.items()}
        x, h0, c0 = _inputs(rim, s["T"], s["B"], s["M"], torch.float64, False, False)
        x, h0 = x.cuda(), h0.cuda()
        c0 = None if c0 is None else c0.cuda()
        lo = lambda t: None if t is None else t.to(dtype)
        w = _loss_weights(s["T"], s["B"], s["K"], s["H"])
        vals, grads, masks = _run(rt.rim_triton, lo(x), lo(h0), lo(c0), pk, cfg, w, training=False)
        rvals, rgrads, _ = _run(rim_ref, x, h0, c0, p64, cfg, w, masks=masks)
        if dtype == torch.float32:
            for name in ("out", "h_n", "c_n"):
                if rvals[name] is not None:
                    assert_close(name, vals[name], rvals[name], dtype, "out")
            for name, g in rgrads.items():
                assert_close(f"grad_{name}", grads[name], g, dtype,
                             "grad_in" if name in ("x", "h0", "c0") else "grad_w")
        else:  # flash-attention's rule: err(kernel) <= 2 err(reference in dtype) + atol
            qvals, qgrads, _ = _run(rim_ref, lo(x), lo(h0), lo(c0), pk, cfg, w, masks=masks)
            both = [(n, vals[n], qvals[n], rvals[n]) for n in ("out", "h_n", "c_n") if rvals[n] is not None]
            both += [(f"grad_{n}", grads[n], qgrads[n], rgrads[n]) for n in rgrads]
            for name, a, q, r in both:
                ea = (a.double() - r).abs().max().item()
                eq = (q.double() - r).abs().max().item()
                print(f"{name:>14s} kernel={ea:.3e} ref_{dtype}={eq:.3e}")
                assert ea <= 2 * eq + 1e-2 * max(1.0, r.abs().max().item()), name
        p = _p_under(x, h0, rvals["out"].detach(), p64, cfg)
        print("near-tie rows:", _check_masks(masks, p, s["top_k"], TIE_GAP[dtype]))

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    def test_realistic(self, cell, dtype):
        self._case(cell, dtype)

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_realistic_tiled(self, monkeypatch, cell, dtype):
        monkeypatch.setenv("RIMS_FAST_TRITON_FWD", "tiled")
        self._case(cell, dtype)

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_realistic_bwd_kernels(self, monkeypatch, cell, dtype):
        """RIMS_FAST_TRITON_BWD=kernels at the realistic shape, compiled for the GPU (the
        benchmark's gate checks only the forward)."""
        monkeypatch.setenv("RIMS_FAST_TRITON_BWD", "kernels")
        calls = _count_bwd_launches(monkeypatch)
        self._case(cell, dtype)
        T = self.SHAPE["T"]
        assert calls == {"comm": T, "cell": T}, f"the Triton backward did not run: {calls}"

    @pytest.mark.parametrize("fwd", ["fused", "tiled"])
    def test_large(self, monkeypatch, fwd):
        monkeypatch.setenv("RIMS_FAST_TRITON_FWD", fwd)
        self._case("lstm", torch.bfloat16, self.LARGE)

    @pytest.mark.parametrize("fwd", ["fused", "tiled"])
    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_graph_replay_equals_eager(self, monkeypatch, cell, fwd):
        """RIMS_FAST_TRITON_GRAPH=1: the captured loop gives bit-identical results to the eager
        launches, on the capturing call and on replays with new inputs and updated weights."""
        monkeypatch.setenv("RIMS_FAST_TRITON_FWD", fwd)
        rim = rims_fast.RIM(64, 100, 6, 4, cell=cell, backend="triton", device="cuda")
        xs = [torch.randn(20, 64, 64, device="cuda") for _ in range(2)]

        def run(x):
            with torch.no_grad():
                out, state, masks = rim(x, return_masks=True)
            return out, state, masks

        eager = [run(x) for x in xs]
        monkeypatch.setenv("RIMS_FAST_TRITON_GRAPH", "1")
        rt._GRAPHS.clear()
        graph = [run(x) for x in xs]
        assert len(rt._GRAPHS) == 1, "the second call must replay, not recapture"
        for (o1, s1, m1), (o2, s2, m2) in zip(eager, graph):
            assert torch.equal(o1, o2) and torch.equal(m1, m2)
            for a, b in zip(s1 if cell == "lstm" else (s1,), s2 if cell == "lstm" else (s2,)):
                assert torch.equal(a, b)
        with torch.no_grad():
            rim.weight_hh.mul_(0.5)  # in place: the graph reads the same storage
        replayed = run(xs[0])
        monkeypatch.setenv("RIMS_FAST_TRITON_GRAPH", "0")
        assert torch.equal(replayed[0], run(xs[0])[0])
        rt._GRAPHS.clear()  # the cache would keep this module's parameters alive


# ------------------------------------------------------------ Triton backward kernels
# RIMS_FAST_TRITON_BWD=kernels: the forward saves its activations and the backward runs
# triton_kernels/rim_step_bwd.py; compared with the float64 reference under the same masks and
# dropout draw. (cell, T, B, M, K, top_k, H, n_in, n_c, zero_state, block_inactive_grad, p_in,
# p_c): every axis value at least once per cell.
BWD_GRID = [
    ("lstm", 3, 3, 1, 4, 1, 5, 1, 1, False, True, 0.0, 0.0),
    ("lstm", 3, 2, 3, 4, 2, 5, 2, 2, True, False, 0.3, 0.4),
    ("lstm", 1, 3, 3, 3, 3, 3, 1, 2, False, True, 0.3, 0.4),
    ("lstm", 3, 2, 1, 3, 1, 8, 2, 1, False, False, 0.0, 0.4),
    ("gru", 3, 3, 1, 4, 1, 5, 1, 1, False, False, 0.3, 0.4),
    ("gru", 3, 2, 3, 4, 2, 5, 2, 2, True, True, 0.0, 0.0),
    ("gru", 1, 3, 3, 3, 3, 3, 2, 1, False, False, 0.3, 0.0),
    ("gru", 3, 2, 1, 3, 1, 8, 1, 2, False, True, 0.3, 0.4),
    # H = 20: the recurrent product's reduction in two chunks of 16 gate columns (the last partial)
    ("gru", 2, 3, 2, 3, 2, 20, 1, 2, False, False, 0.3, 0.0),
    ("lstm", 2, 3, 1, 3, 2, 20, 2, 1, True, True, 0.0, 0.4),
]


def _count_calls(monkeypatch, targets):
    """Counts of calls to each launcher ``(module, name, key)`` of ``targets``, by key."""
    calls = {key: 0 for _, _, key in targets}
    for mod, name, key in targets:
        orig = getattr(mod, name)

        def wrap(*a, _orig=orig, _key=key, **kw):
            calls[_key] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(mod, name, wrap)
    return calls


def _count_bwd_launches(monkeypatch):
    return _count_calls(monkeypatch, [(rt._kb, "rim_comm_bwd", "comm"),
                                      (rt._kb, "rim_cell_bwd", "cell")])


def _compare_bwd_kernels(monkeypatch, cell, T, B, M, K, top_k, H, n_in, n_c, zero_state, big,
                         p_in, p_c, seed=0):
    monkeypatch.setenv("RIMS_FAST_TRITON_BWD", "kernels")
    calls = _count_bwd_launches(monkeypatch)
    rim = make_rim(seed=seed, dtype=torch.float64, cell=cell, hidden_size=H, num_units=K,
                   top_k=top_k, input_heads=n_in, comm_heads=n_c, input_size=5, input_key_size=4,
                   input_value_size=3, comm_key_size=3, comm_value_size=2,
                   block_inactive_grad=big, input_dropout=p_in, comm_dropout=p_c)
    cfg = rim.config
    training = p_in > 0 or p_c > 0
    p64 = {n: p.detach() for n, p in rim.named_parameters()}
    pk = {n: p.to(DEV, torch.float32) for n, p in p64.items()}
    x, h0, c0 = _inputs(rim, T, B, M, torch.float32, zero_state, False)
    w = _loss_weights(T, B, K, H)
    torch.manual_seed(5)
    vals, grads, masks = _run(rt.rim_triton, x, h0, c0, pk, cfg, w, training=training)
    assert calls == {"comm": T, "cell": T}, f"the Triton backward did not run: {calls}"
    keep = None
    if training:
        torch.manual_seed(5)
        dseed = int(torch.randint(0, 2 ** 31 - 2, (1,)).item())
        keep = tuple(None if k is None else k.cpu()
                     for k in rt._dropout_keep(cfg, T, B, M, dseed, DEV))
    d = lambda t: None if t is None else t.detach().cpu().double()
    rvals, rgrads, _ = _run(rim_ref, d(x), d(h0), d(c0), p64, cfg, w, masks=masks.cpu(),
                            training=training, dropout_masks=keep)
    for name in ("out", "h_n", "c_n"):
        if rvals[name] is not None:
            assert_close(name, vals[name], rvals[name], torch.float32, "out")
    assert set(grads) == set(rgrads) and len(rgrads) == (14 if cell == "lstm" else 13)
    for name, g in rgrads.items():
        assert_close(f"grad_{name}", grads[name], g, torch.float32,
                     "grad_in" if name in ("x", "h0", "c0") else "grad_w")


@pytest.mark.parametrize("case", BWD_GRID, ids=lambda c: "-".join(map(str, c)))
def test_bwd_kernels_match_reference(monkeypatch, case):
    _compare_bwd_kernels(monkeypatch, *case)


def test_bwd_kernels_two_sample_tiles(monkeypatch):
    """B > BLOCK_B: several programs along the batch, the last one partial."""
    _compare_bwd_kernels(monkeypatch, "lstm", 2, 17, 2, 3, 2, 5, 1, 2, False, False, 0.3, 0.4)


def test_bwd_kernels_partial_grads(monkeypatch):
    """Only ``out`` in the loss (no gradient for h_n, c_n), GRU and LSTM; and no grad needed: the
    forward saves nothing (the op returns empty saved tensors)."""
    monkeypatch.setenv("RIMS_FAST_TRITON_BWD", "kernels")
    for cell in ("lstm", "gru"):
        rim = make_rim(seed=4, dtype=torch.float64, cell=cell, hidden_size=3, num_units=3,
                       top_k=2, input_heads=1, comm_heads=2)
        cfg = rim.config
        p64 = {n: p.detach() for n, p in rim.named_parameters()}
        pk = {n: p.to(DEV, torch.float32).requires_grad_() for n, p in p64.items()}
        x, h0, c0 = _inputs(rim, 2, 2, 2, torch.float32, False, False)
        x.requires_grad_()
        out, _, _, masks = rt.rim_triton(x, h0, c0, pk, cfg)
        gx, gq = torch.autograd.grad(out.sum(), [x, pk["comm_query"]])
        xr = x.detach().double().requires_grad_()
        pr = {n: p.clone().requires_grad_() for n, p in p64.items()}
        ro = rim_ref(xr, h0.double(), None if c0 is None else c0.double(), pr, cfg,
                     masks=masks)[0]
        rx, rq = torch.autograd.grad(ro.sum(), [xr, pr["comm_query"]])
        assert_close("grad_x", gx, rx, torch.float32, "grad_in")
        assert_close("grad_comm_query", gq, rq, torch.float32, "grad_w")
    sizes, cell, p_in, p_c, big = rt._cfg_args(cfg)
    with torch.no_grad():
        res = rt.rim_triton_fwd(x, h0, None, list(pk[n] for n in NAMES), sizes, cell, p_in, p_c,
                                big, False, 0, False)
    assert all(t.numel() == 0 for t in res[4:])


def test_graph_mode_env(monkeypatch):
    monkeypatch.setenv("RIMS_FAST_TRITON_GRAPH", "yes")
    with pytest.raises(ValueError, match="RIMS_FAST_TRITON_GRAPH"):
        rt.graph_mode()
    monkeypatch.setenv("RIMS_FAST_TRITON_GRAPH", "1")
    assert rt.graph_mode()


def test_bwd_mode_default_and_invalid(monkeypatch):
    """Default ``recompute`` (the kernels are not run); unknown values raise."""
    monkeypatch.delenv("RIMS_FAST_TRITON_BWD", raising=False)
    assert rt.bwd_mode() == "recompute"
    calls = _count_bwd_launches(monkeypatch)
    rim = make_rim(seed=2, dtype=torch.float32, hidden_size=3, num_units=2, top_k=1,
                   input_heads=1, comm_heads=1)
    p = {n: q.detach().to(DEV).requires_grad_() for n, q in rim.named_parameters()}
    x = torch.randn(1, 2, 1, 5, device=DEV)
    h0 = torch.zeros(2, 2, 3, device=DEV)
    out = rt.rim_triton(x, h0, torch.zeros_like(h0), p, rim.config)[0]
    out.sum().backward()
    assert calls == {"comm": 0, "cell": 0}
    monkeypatch.setenv("RIMS_FAST_TRITON_BWD", "fast")
    with pytest.raises(ValueError, match="RIMS_FAST_TRITON_BWD"):
        rt.rim_triton(x, h0, torch.zeros_like(h0), p, rim.config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bwd_kernels_half(monkeypatch, cell, dtype):
    """bfloat16 / float16 through the Triton backward (float32 gradient operands): TOL[dtype]."""
    monkeypatch.setenv("RIMS_FAST_TRITON_BWD", "kernels")
    calls = _count_bwd_launches(monkeypatch)
    _compare(cell, 3, 3, 3, 4, 2, 5, 2, 2, False, True, dtype=dtype)
    assert calls == {"comm": 3, "cell": 3}


def test_xw_chunks_equal_one_chunk(monkeypatch):
    """The no-save forward makes XW for a chunk of steps at a time: chunks of 1 and 2 steps give
    the masks of one chunk of all steps, and its outputs and states within float32 round-off
    (LSTM: the c ping-pong crosses chunk boundaries). Not bit for bit: a chunk's XW is one GEMM
    whose row count is the chunk's, and a BLAS may reduce GEMMs of other shapes in other orders
    (MKL on AVX-512 does: 1-ulp differences in XW)."""
    rim = make_rim(seed=1, dtype=torch.float64, input_heads=2, comm_heads=2)
    cfg = rim.config
    pk = {n: p.detach().float().to(DEV) for n, p in rim.named_parameters()}
    x, h0, c0 = _inputs(rim, 5, 3, 2, torch.float64, False, False)
    x, h0, c0 = x.float().to(DEV), h0.float().to(DEV), c0.float().to(DEV)
    res = {}
    per_step = 4 * 3 * cfg.num_units * cfg.input_heads * 2 * cfg.gates * cfg.hidden_size
    for steps in (1, 2, 5):
        monkeypatch.setattr(rt, "XW_CHUNK_BYTES", steps * per_step)
        with torch.no_grad():
            res[steps] = rt.rim_triton(x, h0, c0, pk, cfg)
    for steps in (1, 2):
        out, h_n, c_n, masks = res[steps][:4]
        assert torch.equal(masks, res[5][3]), steps
        for name, a, b in (("out", out, res[5][0]), ("h_n", h_n, res[5][1]), ("c_n", c_n, res[5][2])):
            assert_close(f"{name} ({steps})", a, b, torch.float32)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bwd_kernels_xw_chunks_equal_one_chunk(monkeypatch, cell):
    """With the backward kernels the forward makes XW chunk by chunk too and the backward
    recomputes it chunk by chunk in reverse (XW is not saved): chunks of 1 and 2 steps give the
    masks of one chunk of all steps, and its outputs and gradients within float32 round-off (not
    bit for bit: see test_xw_chunks_equal_one_chunk)."""
    monkeypatch.setenv("RIMS_FAST_TRITON_BWD", "kernels")
    rim = make_rim(seed=2, dtype=torch.float64, cell=cell, input_heads=2, comm_heads=2)
    cfg = rim.config
    pk = {n: p.detach().float().to(DEV) for n, p in rim.named_parameters()}
    x, h0, c0 = _inputs(rim, 5, 3, 2, torch.float32, False, False)
    w = _loss_weights(5, 3, cfg.num_units, cfg.hidden_size)
    per_step = 4 * 3 * cfg.num_units * cfg.input_heads * 2 * cfg.gates * cfg.hidden_size
    res = {}
    for steps in (1, 2, 5):
        monkeypatch.setattr(rt, "XW_CHUNK_BYTES", steps * per_step)
        assert len(rt._chunks(5, 3, 2, cfg)) == -(-5 // steps)
        res[steps] = _run(rt.rim_triton, x.to(DEV), h0.to(DEV),
                          None if c0 is None else c0.to(DEV), pk, cfg, w)
    for steps in (1, 2):
        vals, grads, masks = res[steps]
        assert torch.equal(masks, res[5][2])
        for name, v in vals.items():
            if v is not None:
                assert_close(f"{name} ({steps})", v, res[5][0][name], torch.float32)
        for name, g in grads.items():
            kind = "grad_w" if name in rim.state_dict() else "grad_in"
            assert_close(f"d {name} ({steps})", g, res[5][1][name], torch.float32, kind)


# ------------------------------------------------------------ column-tiled forward
# RIMS_FAST_TRITON_FWD=tiled: triton_kernels/rim_step_fwd_tiled.py (query, gates over unit tiles,
# Q|K|V) then the communication kernel. H = 20 gives two unit tiles of 16 (the last partial),
# H = 40 two of 32, B = 17 two batch tiles of 16 (the last partial), B = 256 four batch tiles of
# 64; float32's reduction chunks of 16 rows: two for H = 20, three for H = 40 (the last partial).


def _count_tiled_launches(monkeypatch):
    return _count_calls(monkeypatch, [(rt._kt, "rim_query_fwd", "query"),
                                      (rt._kt, "rim_gates_fwd", "gates"),
                                      (rt._kt, "rim_comm_qkv_fwd", "qkv"),
                                      (rt._k, "rim_cell_fwd", "cell")])


# (cell, T, B, M, K, top_k, H, n_in, n_c, zero_state, noncontig)
TILED_GRID = [
    ("lstm", 3, 3, 3, 4, 2, 20, 2, 2, False, True),
    ("lstm", 2, 17, 1, 3, 1, 5, 1, 1, True, False),
    ("gru", 3, 3, 3, 4, 2, 20, 2, 1, False, False),
    ("gru", 2, 17, 2, 3, 3, 5, 1, 2, False, True),
    ("lstm", 1, 256, 1, 2, 1, 5, 1, 1, False, False),
    ("gru", 2, 2, 2, 3, 2, 40, 2, 2, False, False),
]


@pytest.mark.parametrize("case", TILED_GRID, ids=lambda c: "-".join(map(str, c)))
def test_tiled_matches_reference(monkeypatch, case):
    monkeypatch.setenv("RIMS_FAST_TRITON_FWD", "tiled")
    calls = _count_tiled_launches(monkeypatch)
    _compare(*case, dtype=torch.float32)
    T = case[1]
    assert calls == {"query": T, "gates": T, "qkv": T, "cell": 0}, calls


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tiled_matches_reference_bf16(monkeypatch, cell):
    monkeypatch.setenv("RIMS_FAST_TRITON_FWD", "tiled")
    _compare(cell, 2, 3, 3, 4, 2, 20, 2, 2, False, False, dtype=torch.bfloat16)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tiled_equals_fused(monkeypatch, cell):
    """Under the interpreter, with the same reduction chunks (16 rows, float32's), the tiled
    kernels give bit-identical outputs, states, masks and (with the Triton backward, which reads
    their saved gates and input probabilities) gradients to the fused kernels, dropout on: each
    value is the same expression over the same operands, and the interpreter's tl.dot (numpy
    float32 matmul) reduces each output element in the same order whatever the tile's width. On
    a GPU the two may differ in the last bits (TestGPU compares both with the reference). Tiles:
    two unit tiles of 16, two reduction chunks (16 + 4 rows)."""
    monkeypatch.setenv("RIMS_FAST_TRITON_BWD", "kernels")
    monkeypatch.setenv("RIMS_FAST_TRITON_TILES", "16,16,16,4")
    rim = make_rim(seed=3, dtype=torch.float64, cell=cell, hidden_size=20, num_units=4, top_k=2,
                   input_heads=2, comm_heads=2, input_size=5, input_key_size=4,
                   input_value_size=3, comm_key_size=3, comm_value_size=2, input_dropout=0.3,
                   comm_dropout=0.2)
    cfg = rim.config
    pk = {n: p.detach().float().to(DEV) for n, p in rim.named_parameters()}
    x, h0, c0 = _inputs(rim, 3, 3, 2, torch.float32, False, False)
    w = _loss_weights(3, 3, cfg.num_units, cfg.hidden_size)
    res = {}
    for mode in ("fused", "tiled"):
        monkeypatch.setenv("RIMS_FAST_TRITON_FWD", mode)
        torch.manual_seed(11)  # the same dropout seed
        res[mode] = _run(rt.rim_triton, x, h0, c0, pk, cfg, w, training=True)
    (vf, gf, mf), (vt, gt, mt) = res["fused"], res["tiled"]
    assert torch.equal(mf, mt)
    for name, v in vf.items():
        assert v is None and vt[name] is None or torch.equal(v, vt[name]), name
    for name, g in gf.items():
        assert torch.equal(g, gt[name]), name


def test_tiled_bwd_kernels_match_reference(monkeypatch):
    """The Triton backward from the tiled forward's saved activations, with dropout."""
    monkeypatch.setenv("RIMS_FAST_TRITON_FWD", "tiled")
    calls = _count_tiled_launches(monkeypatch)
    _compare_bwd_kernels(monkeypatch, "lstm", 2, 17, 2, 3, 2, 20, 2, 2, False, False, 0.3, 0.4)
    assert calls["gates"] == 2 and calls["cell"] == 0


def test_fwd_mode_env(monkeypatch):
    monkeypatch.delenv("RIMS_FAST_TRITON_FWD", raising=False)
    assert rt.fwd_mode() == "fused"
    monkeypatch.setenv("RIMS_FAST_TRITON_FWD", "tiles")
    with pytest.raises(ValueError, match="RIMS_FAST_TRITON_FWD"):
        rt.fwd_mode()


def test_host_size_helpers_equal_tritons():
    """pad / pad_dot / cdiv: plain-Python copies of Triton's helpers for the launchers (Triton's
    are ConstexprFunctions, ~1.6 us a call from host code), with the same values."""
    triton = pytest.importorskip("triton")
    for n in range(0, 2050):
        assert rt._k.pad(n) == triton.next_power_of_2(n)
        assert rt._k.pad_dot(n) == max(16, triton.next_power_of_2(n))
    for a in range(0, 130):
        for b in range(1, 70):
            assert rt._k.cdiv(a, b) == triton.cdiv(a, b)


def test_tile_sizes():
    kt = rt._kt
    assert kt.tile_sizes(64, 100) == (16, 32, 32, 4)
    assert kt.tile_sizes(256, 256) == (64, 32, 32, 8)
    assert kt.tile_sizes(256, 256, fp32=True) == (64, 32, 16, 8)
    assert kt.tile_sizes(3, 20) == (16, 16, 32, 4)


def test_tiles_override(monkeypatch):
    monkeypatch.setenv("RIMS_FAST_TRITON_TILES", "32,16,16,8")
    assert rt.tiles_override() == (32, 16, 16, 8)
    for bad in ("32,16,16", "32,16,8,4", "a,b,c,d", "32,16,16,3"):
        monkeypatch.setenv("RIMS_FAST_TRITON_TILES", bad)
        with pytest.raises(ValueError, match="RIMS_FAST_TRITON_TILES"):
            rt.tiles_override()
    monkeypatch.delenv("RIMS_FAST_TRITON_TILES")
    assert rt.tiles_override() is None
