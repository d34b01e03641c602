"""``backend="cpu"`` (the C++ sequence driver) against the reference ``rim_ref``: outputs, final
states, masks (exactly) and every gradient, dropout replayed under the driver's own masks,
gradcheck and opcheck of the ops, and memory on a long sequence."""

from __future__ import annotations

import pytest
import torch

import rims_fast
from helpers import assert_close, make_rim, random_state
from rims_fast import rim_cpu as rc

pytestmark = pytest.mark.skipif(
    rc.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"C++ sequence driver not built: {rc.unavailable_reason(torch.device('cpu'), torch.float32)}")

PARAMS = rc.PARAM_NAMES

# (cell, M, input_heads, comm_heads, K, top_k, T, block_inactive_grad); H = 3 (odd) from make_rim.
GRID = [
    ("lstm", 1, 1, 1, 4, 2, 5, True),
    ("lstm", 3, 2, 2, 4, 2, 5, True),
    ("lstm", 3, 2, 2, 4, 2, 5, False),
    ("lstm", 1, 2, 1, 4, 1, 1, True),    # top_k = 1, T = 1
    ("lstm", 3, 1, 2, 5, 5, 5, False),   # top_k = K
    ("gru", 1, 1, 1, 4, 2, 5, True),
    ("gru", 3, 2, 2, 4, 2, 5, False),
    ("gru", 1, 2, 2, 4, 4, 1, True),     # top_k = K, T = 1
    ("gru", 3, 1, 1, 5, 1, 5, True),     # top_k = 1
]


def _inputs(cell, M, n_in, n_c, K, top_k, T, block, dtype, zero_state=False, B=3, D=5,
            noncontig=False, seed=0, **kw):
    rim = make_rim(seed=seed, cell=cell, num_units=K, top_k=top_k, input_heads=n_in,
                   comm_heads=n_c, block_inactive_grad=block, input_size=D, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed + 11)
    if noncontig:  # (B, T, M, D) storage, transposed: x is not contiguous
        x = torch.randn(B, T, M, D, generator=g, dtype=dtype).transpose(0, 1)
    else:
        x = torch.randn(T, B, M, D, generator=g, dtype=dtype)
    x.requires_grad_(True)
    if zero_state:
        h0 = torch.zeros(B, K, rim.hidden_size, dtype=dtype)
        c0 = torch.zeros_like(h0) if cell == "lstm" else None
    else:
        st = random_state(rim, B, dtype=dtype, seed=seed + 1)
        h0, c0 = st if cell == "lstm" else (st, None)
    h0.requires_grad_(True)
    if c0 is not None:
        c0.requires_grad_(True)
    P = dict(rim.named_parameters())
    leaves = {"x": x, "h0": h0, **({"c0": c0} if c0 is not None else {}), **P}
    return rim, x, h0, c0, P, leaves


def _grads(outputs, leaves, seed=3):
    """Gradients of a fixed random projection of (out, h_n, c_n) w.r.t. every leaf."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in outputs if o is not None)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (gr if gr is not None else torch.zeros_like(v)) for (n, v), gr in zip(leaves.items(), grads)}


def _compare(got, want, leaves, dtype, masks_exact=True):
    if masks_exact:
        assert torch.equal(got[3], want[3]), "masks differ"
    for name, a, b in zip(("out", "h_n", "c_n"), got[:3], want[:3]):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_close(name, a, b, dtype)
    g_got, g_want = _grads(got[:3], leaves), _grads(want[:3], leaves)
    for name in leaves:
        assert_close("d" + name, g_got[name], g_want[name], dtype,
                     "grad_w" if name in PARAMS else "grad_in")


@pytest.fixture(params=["folded", "kv"])
def input_path(request, monkeypatch):
    """rim_cpu feeds the pre-projected op either the input elements and the fold
    input_value weight_ih (rc.input_fold) or the values x input_value and weight_ih itself, by the
    reference's rule (rc.folds_input: M*D <= d_v); each test taking this fixture runs both."""
    monkeypatch.setattr(rc, "folds_input", lambda *a, **k: request.param == "folded")
    return request.param


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("state", ["state", "zero"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference(case, state, dtype, input_path):
    rim, x, h0, c0, P, leaves = _inputs(*case, dtype=dtype, zero_state=state == "zero")
    got = rc.rim_cpu(x, h0, c0, P, rim.config)
    if dtype == torch.float64:
        want = rims_fast.rim_ref(x, h0, c0, P, rim.config)
        _compare(got, want, leaves, dtype)
        return
    # float32: expected values from the float64 reference, under the driver's own masks where
    # the competition is within round-off of a tie (SPEC "Module API").
    leaves64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    P64 = {n: leaves64[n] for n in PARAMS}
    ref_masks = rims_fast.rim_ref(leaves64["x"], leaves64["h0"], leaves64.get("c0"), P64,
                                  rim.config)[3]
    masks = got[3] if not torch.equal(got[3], ref_masks) else None
    want = rims_fast.rim_ref(leaves64["x"], leaves64["h0"], leaves64.get("c0"), P64, rim.config,
                             masks=masks)
    _compare_mixed(got, want, leaves, leaves64, dtype)


def _compare_mixed(got, want, leaves, leaves64, dtype):
    for name, a, b in zip(("out", "h_n", "c_n"), got[:3], want[:3]):
        if b is not None:
            assert a.dtype == dtype
            assert_close(name, a, b, dtype)
    g_got, g_want = _grads(got[:3], leaves), _grads(want[:3], leaves64)
    for name in leaves:
        assert_close("d" + name, g_got[name], g_want[name], dtype,
                     "grad_w" if name in PARAMS else "grad_in")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_noncontiguous_x_and_larger_sizes(cell):
    """Non-contiguous x; H = 11 (odd, above the 8-wide vector body); M = 2; float32 and 64."""
    for dtype in (torch.float64, torch.float32):
        rim, x, h0, c0, P, leaves = _inputs(cell, 2, 2, 2, 5, 3, 4, True, dtype, noncontig=True,
                                            B=4, hidden_size=11, input_value_size=7)
        assert not x.is_contiguous()
        got = rc.rim_cpu(x, h0, c0, P, rim.config)
        if dtype == torch.float64:
            _compare(got, rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, dtype)
        else:
            leaves64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
            P64 = {n: leaves64[n] for n in PARAMS}
            want = rims_fast.rim_ref(leaves64["x"], leaves64["h0"], leaves64.get("c0"), P64,
                                     rim.config, masks=got[3])
            _compare_mixed(got, want, leaves, leaves64, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_threads_and_batch_tiles(cell):
    """B = 37 at 2 threads: the forward splits the batch into tiles (>= 8 samples each) run on
    separate threads, the backward's phases run on the team; same results as 1 thread (float64,
    to round-off) and as the reference."""
    old = torch.get_num_threads()
    try:
        res = {}
        for nt in (1, 2):
            torch.set_num_threads(nt)
            rim, x, h0, c0, P, leaves = _inputs(cell, 2, 2, 2, 5, 2, 4, True, torch.float64, B=37,
                                                hidden_size=11)
            _compare(rc.rim_cpu(x, h0, c0, P, rim.config),
                     rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, torch.float64)
            got = rc.rim_cpu(x, h0, c0, P, rim.config)
            res[nt] = (got, _grads(got[:3], leaves))
        (o1, g1), (o2, g2) = res[1], res[2]
        assert torch.equal(o1[3], o2[3])
        for a, b in zip(o1[:3], o2[:3]):
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
        for n in g1:
            assert torch.allclose(g1[n], g2[n], rtol=1e-10, atol=1e-10), n
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype, input_path):
    rim, x, h0, c0, P, leaves = _inputs("lstm", 2, 2, 2, 4, 2, 4, True, dtype)
    got = rc.rim_cpu(x, h0, c0, P, rim.config)
    assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
    leaves64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    P64 = {n: leaves64[n] for n in PARAMS}
    want = rims_fast.rim_ref(leaves64["x"], leaves64["h0"], leaves64["c0"], P64, rim.config,
                             masks=got[3])
    _compare_mixed(got, want, leaves, leaves64, dtype)


def test_module_backend_cpu_and_auto():
    rim = make_rim(backend="cpu", dtype=torch.float64)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    out, (h, c) = rim(x)
    assert rim.last_backend == "cpu"
    rim.backend = "torch"
    ref, (hr, cr) = rim(x)
    assert_close("out", out, ref, torch.float64)
    rim.backend = "auto"
    rim(x)
    assert rim.last_backend == "cpu"


@pytest.mark.parametrize("where", ["x", "h0", "weight_hh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_nan_propagates(cell, dtype, where, input_path):
    """README's NaN policy: a NaN in the input, the state or a parameter reaches the outputs
    and the gradients, as on the reference (the float32 drivers' vector exp once clamped NaN to
    a finite value: a diverged run then looked healthy)."""
    rim = make_rim(cell=cell, dtype=dtype, backend="cpu", hidden_size=16)  # the SIMD row widths
    x = torch.randn(4, 3, 5, dtype=dtype)
    h0, c0 = random_state(rim, 3, dtype=dtype) if cell == "lstm" else (
        random_state(rim, 3, dtype=dtype), None)
    state = (h0, c0) if cell == "lstm" else h0
    if where == "x":
        x[1, 0, 2] = float("nan")
    elif where == "h0":
        h0[0, 1, 0] = float("nan")
    else:
        with torch.no_grad():
            rim.weight_hh[0, 0, 0] = float("nan")
    x.requires_grad_(True)
    out, st = rim(x, state)
    assert rim.last_backend == "cpu"
    h_n = st[0] if cell == "lstm" else st
    assert torch.isnan(out).any() and torch.isnan(h_n).any()
    out.sum().backward()
    assert torch.isnan(x.grad).any() or torch.isnan(rim.weight_hh.grad).any()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_replays_in_reference(cell, input_path):
    """Training with both dropouts: the reference, given the driver's keep-masks, matches it."""
    rim, x, h0, c0, P, leaves = _inputs(cell, 3, 2, 2, 4, 2, 4, True, torch.float64,
                                        input_dropout=0.3, comm_dropout=0.4)
    torch.manual_seed(123)
    got = rc.rim_cpu(x, h0, c0, P, rim.config, training=True)
    torch.manual_seed(123)  # the same seed draw as rim_cpu makes
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())
    keep = rc.dropout_masks(seed, x.shape[0], x.shape[1], x.shape[2], rim.config)
    assert 0.5 < keep[0].float().mean() < 0.9 and 0.4 < keep[1].float().mean() < 0.8
    want = rims_fast.rim_ref(x, h0, c0, P, rim.config, training=True, dropout_masks=keep)
    _compare(got, want, leaves, torch.float64)
    # Not a no-op: without dropout the result differs.
    plain = rc.rim_cpu(x, h0, c0, P, rim.config, training=False)
    assert (plain[0] - got[0]).abs().max() > 1e-3


def test_dropout_reproducible_under_manual_seed():
    rim, x, h0, c0, P, _ = _inputs("lstm", 2, 1, 2, 4, 2, 4, True, torch.float32,
                                   input_dropout=0.5, comm_dropout=0.5)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(rc.rim_cpu(x, h0, c0, P, rim.config, training=True)[0])
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(8)
    assert not torch.equal(outs[0], rc.rim_cpu(x, h0, c0, P, rim.config, training=True)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck(cell, input_path):
    """torch.autograd.gradcheck of the op in float64 (random state: no ties in the competition;
    block_inactive_grad=False so every path is exercised), with dropout on in training mode."""
    rim, x, h0, c0, P, leaves = _inputs(cell, 2, 2, 2, 4, 2, 3, False, torch.float64, B=2,
                                        input_dropout=0.25, comm_dropout=0.25)
    names = list(leaves)
    seed = 99

    def f(*tensors):
        d = dict(zip(names, tensors))
        torch.manual_seed(seed)  # the same dropout draw at every evaluation
        out, h_n, c_n, _ = rc.rim_cpu(d["x"], d["h0"], d.get("c0"), {n: d[n] for n in PARAMS},
                                      rim.config, training=True)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()), eps=1e-6, atol=1e-7)


def test_folds_input_rule_and_fold():
    """The fold is chosen by the layer (the reference's rule), never by T; it is the product of the
    two weights, not differentiable; and a write through .data (which does not bump the version
    counter, as RL libraries update target networks) shows in the next call's output, which once
    came from a stale cached fold."""
    cfg = rims_fast.RIM(64, 100, 6, 4).config
    assert rc.folds_input(1, 64, cfg) and not rc.folds_input(1, 512, cfg)
    rim = rims_fast.RIM(64, 20, 3, 2, input_heads=2, input_value_size=40, backend="cpu")
    P = {n: p for n, p in rim.named_parameters()}
    want = torch.einsum("dnv,knvg->kndg", P["input_value"].view(64, 2, 40),
                        P["weight_ih"].view(3, 2, 40, 80)).reshape(3, 128, 80)
    fold = rc.input_fold(P["input_value"], P["weight_ih"], rim.config, torch.float32)
    assert not fold.requires_grad
    torch.testing.assert_close(fold, want.detach(), rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        before = rim(x)[0]
        version = rim.weight_ih._version
        rim.weight_ih.data.mul_(3)
        rim.input_value.data.mul_(0.5)
        assert rim.weight_ih._version == version
        after = rim(x)[0]
        ref = rims_fast.RIM(64, 20, 3, 2, input_heads=2, input_value_size=40, backend="torch")
        ref.load_state_dict(rim.state_dict())
        want_out = ref(x)[0]
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("n_in", [1, 2])
def test_fold_gradient_from_factors_equals_dense(cell, n_in, monkeypatch):
    """The folded path's input_value / weight_ih gradients from the op's per-row factors (calls
    with few rows) equal the dense ones from the fold's gradient (float64, training with dropout,
    multi-head), and the rule picks factors exactly below D G H / (D + G H) rows."""
    assert rc.fold_grad_from_factors(55, 64, 400) and not rc.fold_grad_from_factors(56, 64, 400)
    rim, x, h0, c0, P, leaves = _inputs(cell, 2, n_in, 2, 4, 2, 3, False, torch.float64, B=2,
                                        input_dropout=0.3, comm_dropout=0.2)
    monkeypatch.setattr(rc, "folds_input", lambda *a, **k: True)
    grads = {}
    for factors in (True, False):
        monkeypatch.setattr(rc, "fold_grad_from_factors", lambda *a, f=factors: f)
        torch.manual_seed(5)
        got = rc.rim_cpu(x, h0, c0, P, rim.config, training=True)
        grads[factors] = _grads(got[:3], leaves)
    for name in leaves:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-12,
                                   atol=1e-12, msg="d" + name)
    # ... and the dense path against finite differences too (test_gradcheck runs the factors).
    names = list(leaves)

    def f(*tensors):
        d = dict(zip(names, tensors))
        torch.manual_seed(5)
        out, h_n, c_n, _ = rc.rim_cpu(d["x"], d["h0"], d.get("c0"), {n: d[n] for n in PARAMS},
                                      rim.config, training=True)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_split_calls_equal_one_call(cell):
    """SPEC "Dtypes": a sequence split into calls (RIMCell steps, an RL rollout) equals one call
    exactly in float32/float64, also at the paper layer where a one-step call once took another
    input path (and summed in another order)."""
    torch.manual_seed(0)
    rim = rims_fast.RIM(64, 100, 6, 4, cell=cell, backend="cpu")
    cell_m = rims_fast.RIMCell(64, 100, 6, 4, cell=cell, backend="cpu")
    cell_m.load_state_dict(rim.state_dict())
    x = torch.randn(7, 3, 64)
    with torch.no_grad():
        out, state = rim(x)
        st, outs = None, []
        for t in range(7):
            st, _ = cell_m(x[t], st)
            outs.append((st[0] if cell == "lstm" else st).reshape(3, -1))
    assert torch.equal(torch.stack(outs), out)
    assert torch.equal(st[0] if cell == "lstm" else st, state[0] if cell == "lstm" else state)


def test_kv_opcheck_gru_float32():
    """opcheck of both pre-projected ops for a GRU (c0 None) in float32 (test_kv_opcheck_and_errors
    runs an LSTM in float64)."""
    gru, x, h0, _, P, _ = _inputs("gru", 1, 1, 1, 3, 1, 2, True, torch.float32, B=2)
    cfg = gru.config
    keys, vals = (x @ P["input_key"]).detach(), (x @ P["input_value"]).detach()
    W = [P[n].detach() for n in rc.KV_PARAM_NAMES]
    tail = (cfg.top_k, cfg.input_heads, cfg.comm_heads, 0.0, 0.0, 0, True, True)
    torch.library.opcheck(torch.ops.rims_fast.rim_cpu_kv_fwd.default,
                          (keys, vals, h0.detach(), None, *W, *tail))
    fwd = torch.ops.rims_fast.rim_cpu_kv_fwd(keys, vals, h0.detach(), None, *W, *tail)
    args = (torch.randn_like(fwd[0]), None, None, keys, vals, h0.detach(), None, *W, fwd[0],
            *fwd[3:], *tail[:-1], True)
    torch.library.opcheck(torch.ops.rims_fast.rim_cpu_kv_bwd.default, args)


def test_long_sequence_memory():
    """T = 2000, tiny sizes: under no_grad nothing is saved (the forward runs with save=False and
    reuses one step's buffers); with grad, what the op saves is exactly the documented set (the
    per-step activations, linear in T) and what autograd saves in all grows by that plus the
    step's keys, values, output and masks per step."""
    T, B, K, H, M = 2000, 2, 4, 3, 1
    rim = make_rim(dtype=torch.float32)
    cfg = rim.config
    D = rim.input_size
    x = torch.randn(T, B, M, D)
    h0 = torch.zeros(B, K, H)
    P = {n: p.detach() for n, p in rim.named_parameters()}
    keys, values = x @ P["input_key"], x @ P["input_value"]
    args = (keys, values, h0, h0, *[P[n] for n in rc.KV_PARAM_NAMES], cfg.top_k, cfg.input_heads,
            cfg.comm_heads, 0.0, 0.0, 0, True)
    nosave = torch.ops.rims_fast.rim_cpu_kv_fwd(*args, False)
    assert all(t.numel() == 0 for t in nosave[4:]), "save=False must keep no per-step tensors"
    saved = torch.ops.rims_fast.rim_cpu_kv_fwd(*args, True)
    assert torch.equal(saved[0], nosave[0]) and torch.equal(saved[3], nosave[3])
    nk, GH = cfg.input_heads * cfg.input_key_size, 4 * H
    ck, cv, n_in, n_c = cfg.comm_heads * cfg.comm_key_size, cfg.comm_heads * cfg.comm_value_size, \
        cfg.input_heads, cfg.comm_heads
    per_step = B * K * (H + H + nk + n_in * M + GH + 2 * ck + cv + n_c * K + cv)  # c, h~, q, a,
    assert sum(t.numel() for t in saved[4:]) == T * per_step  # gates, qkv, b, o
    assert not rc.folds_input(M, D, cfg)  # values = x input_value

    def saved_by_autograd(T):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.no_grad():
                rc.rim_cpu(x[:T], h0, h0, P, cfg)
            assert sizes == [], "no_grad must save nothing"
            xg = x[:T].clone().requires_grad_(True)
            out = rc.rim_cpu(xg, h0, h0, P, cfg)[0]
        out.sum().backward()
        assert torch.isfinite(xg.grad).all()
        return sum(sizes)

    # Per step beyond the op's activations: keys and values (the op's inputs), out and masks.
    # (The parameters are detached here, so the projections save no copy of x.)
    extra = B * M * (nk + n_in * cfg.input_value_size) + B * K * H + B * K
    assert saved_by_autograd(T) - saved_by_autograd(T // 2) == (T - T // 2) * (per_step + extra)


# ---- pre-projected mode (rim_cpu_kv): the keys and values are given, the input term unfolded --

def _kv_run(x, h0, c0, P, cfg, **kw):
    """rim_cpu_kv with keys = x input_key, values = x input_value (autograd through both)."""
    return rc.rim_cpu_kv(x @ P["input_key"], x @ P["input_value"], h0, c0, P, cfg, **kw)


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_kv_matches_reference(case, dtype):
    """Keys and values projected outside: same outputs, masks and every gradient (x, state and
    all parameters, input_key/input_value through the caller's products) as rim_ref."""
    rim, x, h0, c0, P, leaves = _inputs(*case, dtype=dtype)
    got = _kv_run(x, h0, c0, P, rim.config)
    if dtype == torch.float64:
        _compare(got, rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, dtype)
        return
    leaves64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    P64 = {n: leaves64[n] for n in PARAMS}
    want = rims_fast.rim_ref(leaves64["x"], leaves64["h0"], leaves64.get("c0"), P64, rim.config,
                             masks=got[3])
    _compare_mixed(got, want, leaves, leaves64, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_kv_threads_dropout_and_wide_values(cell):
    """B = 37 over several batch tiles at 2 threads, d_v = 7 > D, both dropouts replayed by the
    reference from the driver's keep-masks."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rim, x, h0, c0, P, leaves = _inputs(cell, 3, 2, 2, 5, 2, 4, True, torch.float64, B=37,
                                            hidden_size=11, input_value_size=7,
                                            input_dropout=0.3, comm_dropout=0.4)
        got = _kv_run(x, h0, c0, P, rim.config, training=True, seed=1234)
        keep = rc.dropout_masks(1234, x.shape[0], x.shape[1], x.shape[2], rim.config)
        want = rims_fast.rim_ref(x, h0, c0, P, rim.config, training=True, dropout_masks=keep)
        _compare(got, want, leaves, torch.float64)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_kv_gradcheck(cell):
    rim, x, h0, c0, P, _ = _inputs(cell, 2, 2, 2, 4, 2, 3, False, torch.float64, B=2,
                                   input_dropout=0.25, comm_dropout=0.25)
    keys = (x @ P["input_key"]).detach().requires_grad_(True)
    vals = (x @ P["input_value"]).detach().requires_grad_(True)
    state = [h0] + ([c0] if c0 is not None else [])
    W = [P[n] for n in rc.KV_PARAM_NAMES]

    def f(keys, vals, *rest):
        h, c = rest[0], (rest[1] if c0 is not None else None)
        w = dict(zip(rc.KV_PARAM_NAMES, rest[len(state):]))
        out, h_n, c_n, _ = rc.rim_cpu_kv(keys, vals, h, c, w, rim.config, training=True, seed=5)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    assert torch.autograd.gradcheck(f, (keys, vals, *state, *W), eps=1e-6, atol=1e-7)


def test_kv_opcheck_and_errors():
    rim, x, h0, c0, P, _ = _inputs("lstm", 2, 2, 2, 3, 2, 2, True, torch.float64, B=2)
    cfg = rim.config
    keys, vals = (x @ P["input_key"]).detach(), (x @ P["input_value"]).detach()
    W = [P[n].detach() for n in rc.KV_PARAM_NAMES]
    tail = (cfg.top_k, cfg.input_heads, cfg.comm_heads, 0.0, 0.0, 0, True, True)
    torch.library.opcheck(torch.ops.rims_fast.rim_cpu_kv_fwd.default,
                          (keys, vals, h0.detach(), c0.detach(), *W, *tail))
    fwd = torch.ops.rims_fast.rim_cpu_kv_fwd(keys, vals, h0.detach(), c0.detach(), *W, *tail)
    g_out = torch.randn_like(fwd[0])
    for factors in (False, True):  # the backward, with and without the weight_ih factors
        args = (g_out, None, None, keys, vals, h0.detach(), c0.detach(), *W, fwd[0], *fwd[3:],
                *tail[:-1], factors)
        torch.library.opcheck(torch.ops.rims_fast.rim_cpu_kv_bwd.default, args)
        res = torch.ops.rims_fast.rim_cpu_kv_bwd(*args)
        assert len(res) == 15 and (res[13].numel() > 0) == factors
    with pytest.raises(RuntimeError, match="values must have shape"):
        torch.ops.rims_fast.rim_cpu_kv_fwd(keys, vals[..., :-1], h0.detach(), c0.detach(), *W,
                                           *tail)
    with pytest.raises(RuntimeError, match="keys must have shape"):
        torch.ops.rims_fast.rim_cpu_kv_fwd(keys[..., :-1], vals, h0.detach(), c0.detach(), *W,
                                           *tail)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.rims_fast.rim_cpu_kv_fwd(keys.float(), vals, h0.detach(), c0.detach(), *W,
                                           *tail)


@pytest.mark.parametrize("input_path", ["folded", "kv"])
def test_folded_path_saves_nothing_without_grad_and_refuses_double_backward(input_path,
                                                                           monkeypatch):
    """The folded path (an autograd.Function around the op) runs the op with save=False under
    no_grad, as the kv path does; frozen input_value/weight_ih get no gradient; and double
    backward (create_graph=True, e.g. a gradient penalty) raises instead of returning wrong
    second derivatives (the backward op has no gradient of its own)."""
    monkeypatch.setattr(rc, "folds_input", lambda *a, **k: input_path == "folded")
    rim, x, h0, c0, P, _ = _inputs("lstm", 2, 2, 2, 3, 2, 2, True, torch.float64, B=2)
    calls = []
    real = torch.ops.rims_fast.rim_cpu_kv_fwd

    def spy(*args):
        calls.append(args[-1])  # save
        return real(*args)

    monkeypatch.setattr(torch.ops.rims_fast, "rim_cpu_kv_fwd", spy)
    with torch.no_grad():
        rc.rim_cpu(x, h0, c0, P, rim.config)
    assert calls == [False]
    frozen = {n: (v.detach() if n in ("input_value", "weight_ih") else v) for n, v in P.items()}
    out = rc.rim_cpu(x, h0, c0, frozen, rim.config)[0]
    assert calls[-1] is True
    g = torch.autograd.grad(out.sum(), [x, P["weight_hh"]], create_graph=False)
    assert all(t is not None for t in g)
    out = rc.rim_cpu(x, h0, c0, P, rim.config)[0]
    with pytest.raises(RuntimeError):  # kv: at create_graph=True; folded: differentiating gx
        (gx,) = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
        torch.autograd.grad(gx.sum(), [x])
