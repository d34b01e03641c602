"""``rims_fast::rim_steps_fwd`` / ``rim_steps_bwd`` (the stepped forward and backward: batched
GEMMs and four small kernels per step, ``csrc/kernels/rim_step_{fwd,bwd}.cuh``) against the
persistent kernels and ``rim_ref``.

Without a GPU the ops' CPU implementations run the same drivers with ATen's CPU GEMMs and the
phases as host loops, so these tests check their arithmetic in CI: every output and saved
activation of the forward, and every output of the backward, against the persistent kernels'
host runs (the two pairs are interchangeable: same inputs, outputs and saved layouts), masks
exactly, the gradients against the reference and by gradcheck, dropout (the same counter-based
stream). The ``gpu`` tests run the CUDA phases and cuBLAS.
"""

from __future__ import annotations

import host_cases
import pytest
import torch

import rims_fast
from helpers import assert_close
from rims_fast import rim_seq as rs
from test_rim_seq import (GRID, MMA_WIDE, PARAMS, _compare, _grads, _paper_cuda, _setup,
                          check_graph_capture, check_paper_run)

_WHY = rs.unavailable_reason(torch.device("cpu"), torch.float64)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"rim_steps_fwd not built: {_WHY}")

# GRID (H = 3) plus wider layers (H = 20, several heads, per-head and folded input terms).
CASES = GRID + MMA_WIDE


def _setup_case(case, **kw):
    extra = case[8] if len(case) > 8 else {}
    return _setup(*case[:8], **extra, **kw)


def _op_args(x, h0, c0, P, cfg, p_in=0.0, p_c=0.0, seed=0):
    p = {n: t.detach() for n, t in P.items()}
    keys, xsrc, w_x, per_head = rs._hoisted(x.detach(), p, cfg)
    return (keys, xsrc, w_x, h0.detach(), None if c0 is None else c0.detach(),
            *[p[n] for n in rs.OP_WEIGHTS], cfg.top_k, cfg.input_heads, cfg.comm_heads,
            per_head, p_in, p_c, seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_stepped_matches_reference_float64(case):
    rim, x, h0, c0, P, leaves = _setup_case(case)
    got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
    _compare(got, rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, torch.float64)


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_saved_activations_are_the_persistent_forwards(case, dropout):
    """Every output and saved activation equals the persistent forward's up to float64 rounding
    (the GEMMs sum in another order), masks exactly: the persistent backward reads them."""
    rim, x, h0, c0, P, _ = _setup_case(case)
    args = _op_args(x, h0, c0, P, rim.config, *((0.3, 0.4, 11) if dropout else ()))
    want = torch.ops.rims_fast.rim_seq_fwd(*args, 3, True)
    got = torch.ops.rims_fast.rim_steps_fwd(*args, True)
    assert torch.equal(got[3], want[3]), "masks differ"
    names = ["out", "h_n", "c_n", "masks", *rs.SAVED]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        if a.numel() and name != "masks":
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    # Without saving: the same outputs, nothing saved.
    lean = torch.ops.rims_fast.rim_steps_fwd(*args, False)
    for a, b in zip(lean[:4], got[:4]):
        assert torch.equal(a, b)
    assert all(t.numel() == 0 for t in lean[4:])


def _bwd_args(case, dropout, block, grads):
    """The forward's saved activations (persistent forward) and incoming gradients, as the
    backward ops take them. grads: which of d out, d h_n, d c_n are given (None for the rest)."""
    rim, x, h0, c0, P, _ = _setup_case(case, block_inactive_grad=block)
    cfg = rim.config
    fwd = _op_args(x, h0, c0, P, cfg, *((0.3, 0.4, 11) if dropout else ()))
    res = torch.ops.rims_fast.rim_seq_fwd(*fwd, 3, True)
    g = torch.Generator().manual_seed(5)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    lstm = cfg.cell == "lstm"
    gs = [rnd(res[0]) if "out" in grads else None, rnd(res[1]) if "h_n" in grads else None,
          rnd(res[2]) if lstm and "c_n" in grads else None]
    return (*gs, *fwd[:13], res[3], res[4:], *fwd[13:], block)


@pytest.mark.parametrize("grads", [("out", "h_n", "c_n"), ("out",), ("h_n", "c_n")],
                         ids=["all", "out", "final"])
@pytest.mark.parametrize("dropout,block", [(False, True), (True, False)],
                         ids=["plain", "dropout-kv_grad"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_backward_equals_the_persistent_backward(case, dropout, block, grads):
    """rim_steps_bwd writes what rim_seq_bwd does (d keys, d x, d h0, d c0 and the per-step
    gradients the weight-gradient GEMMs read) up to float64 rounding, from the same saved
    activations and incoming gradients."""
    args = _bwd_args(case, dropout, block, grads)
    want = torch.ops.rims_fast.rim_seq_bwd(*args, 3)
    got = torch.ops.rims_fast.rim_steps_bwd(*args)
    names = ("d keys", "d xsrc", "d h0", "d c0", "dq", "d gates", "d qkv", "dh'", "xa")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("tile", [1, 3])
@pytest.mark.parametrize("dropout,block", [(False, True), (True, False)],
                         ids=["plain", "dropout-kv_grad"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_persistent_backward_hoisted_equals_f(case, dropout, block, tile):
    """rim_seq_bwd with the input term hoisted (xw=1: the sweep reads x F, d x and xa come from
    GEMMs after it) writes what it writes reading F (xw=0), up to float64 rounding."""
    args = _bwd_args(case, dropout, block, ("out", "h_n", "c_n"))
    want = torch.ops.rims_fast.rim_seq_bwd(*args, tile, False, 0)
    got = torch.ops.rims_fast.rim_seq_bwd(*args, tile, False, 1)
    names = ("d keys", "d xsrc", "d h0", "d c0", "dq", "d gates", "d qkv", "dh'", "xa")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    with pytest.raises(RuntimeError, match="mma=True needs xw=0 or -1"):
        torch.ops.rims_fast.rim_seq_bwd(*args, tile, True, 1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("per_head", [False, True], ids=["folded", "per_head"])
def test_gradcheck(cell, per_head):
    """torch.autograd.gradcheck through the stepped forward and backward in float64 (as
    test_rim_seq's: block_inactive_grad=False, dropout on)."""
    rim, x, h0, c0, P, leaves = _setup(cell, 2, 2, 2, 4, 2, 3, 2 if per_head else 16, B=3,
                                       block_inactive_grad=False, input_dropout=0.25,
                                       comm_dropout=0.25)
    names = list(leaves)

    def f(*tensors):
        d = dict(zip(names, tensors))
        out, h_n, c_n, _ = rs.rim_seq(d["x"], d["h0"], d.get("c0"), {n: d[n] for n in PARAMS},
                                      rim.config, training=True, seed=17, stepped=True)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", GRID[:2] + GRID[4:5], ids=lambda c: "-".join(map(str, c)))
def test_stepped_float32_against_float64(case):
    rim, x, h0, c0, P, leaves = _setup(*case, dtype=torch.float32)
    got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
    l64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    want = rims_fast.rim_ref(l64["x"], l64["h0"], l64.get("c0"), {n: l64[n] for n in PARAMS},
                             rim.config, masks=got[3])
    _compare(got, want, leaves, torch.float32, l64)


# ---- the fused kernels (RIMS_FAST_CUDA_FUSED=1: csrc/kernels/rim_step_gates.cuh, gates + LSTM
# cell; rim_step_output.cuh, output + residual) ---------------------------------------------------
# Host runs: the WMMA product written out, with its alignment and leading-dimension requirements
# checked, so the tiling, padding, gate interleaving and the epilogues run here in float64.

_FUSED_IDS = ["-".join(map(str, c)) + "".join(f"-{k}{v}" for k, v in s.items())
              for c, s in zip(host_cases.FUSED, host_cases.FUSED_SETUP)]
_FUSED_CASES = list(zip(host_cases.FUSED, host_cases.FUSED_SETUP))


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("case,setup", _FUSED_CASES, ids=_FUSED_IDS)
def test_fused_equals_gemm_path(case, setup, dropout):
    """Every output and saved activation of the fused forward equals the GEMM path's to float64
    rounding (the products sum in another order), masks exactly; saving or not changes no
    output; and the fused kernels did run: the sums' order shows in the last bits wherever a
    fused product sums 16 or more terms (every LSTM gate product, kd >= 16; the GRU's output
    product only in the last case, cv = 24 — the grid's cv of 2-4 sum in the GEMM's order)."""
    rim, x, h0, c0, P, _ = _setup(*case, **setup)
    args = _op_args(x, h0, c0, P, rim.config, *((0.3, 0.4, 11) if dropout else ()))
    with host_cases.fused(False):
        want = torch.ops.rims_fast.rim_steps_fwd(*args, True)
    with host_cases.fused():
        got = torch.ops.rims_fast.rim_steps_fwd(*args, True)
        unsaved = torch.ops.rims_fast.rim_steps_fwd(*args, False)
    assert torch.equal(got[3], want[3]), "masks differ"
    assert sum(w.numel() for w in want[4:]) > 0
    for i, (a, b) in enumerate(zip(got, want)):
        if i != 3:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"output {i}")
    for i in range(4):
        assert torch.equal(unsaved[i], got[i]), f"output {i} without saving"
    c = rim.config
    if case[0] == "lstm" or c.comm_heads * c.comm_value_size >= 16:
        assert not torch.equal(got[0], want[0]), "the fused kernels did not run"


@pytest.mark.parametrize("case,setup", _FUSED_CASES, ids=_FUSED_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_matches_reference(case, setup, dtype):
    """The fused forward and the stepped backward after it against the float64 reference (under
    the run's masks in float32): outputs and every gradient by the tolerance table."""
    rim, x, h0, c0, P, leaves = _setup(*case, dtype=dtype, **setup)
    with host_cases.fused():
        got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
    l64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    want = rims_fast.rim_ref(l64["x"], l64["h0"], l64.get("c0"), {n: l64[n] for n in PARAMS},
                             rim.config, masks=got[3] if dtype != torch.float64 else None)
    _compare(got, want, leaves, dtype, l64)


def test_fused_env_checked(monkeypatch):
    """RIMS_FAST_CUDA_FUSED is 0 (default) or 1; rim_seq checks it before any launch."""
    assert not rs.fused_mode()
    monkeypatch.setenv("RIMS_FAST_CUDA_FUSED", "1")
    assert rs.fused_mode()
    rim, x, h0, c0, P, _ = _setup(*GRID[4])
    for bad in ("2", "on"):
        monkeypatch.setenv("RIMS_FAST_CUDA_FUSED", bad)
        with pytest.raises(ValueError, match="RIMS_FAST_CUDA_FUSED must be 0 or 1"):
            rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)


def test_opcheck_and_errors():
    rim, x, h0, c0, P, _ = _setup("lstm", 2, 2, 2, 3, 2, 2, 3, B=2)
    args = _op_args(x, h0, c0, P, rim.config)
    torch.library.opcheck(torch.ops.rims_fast.rim_steps_fwd.default, args + (True,))
    torch.library.opcheck(torch.ops.rims_fast.rim_steps_fwd.default, args + (False,))
    torch.library.opcheck(torch.ops.rims_fast.rim_steps_bwd.default,
                          _bwd_args(GRID[0], True, False, ("out", "h_n", "c_n")))
    sizes, cell, _, _, big = rims_fast._config.cfg_args(rim.config)
    keys, xsrc, w_x, h0d, c0d, *rest = args
    weights = [w.requires_grad_(True) for w in rest[:len(rs.OP_WEIGHTS)]]
    torch.library.opcheck(rs.rim_seq_op, (keys.requires_grad_(True), xsrc, w_x,
                                          h0d.requires_grad_(True), c0d, weights, sizes, cell,
                                          0.2, 0.3, big, rest[-4], 5, 0, True, False, 0, 0,
                                          0, True))
    bad = list(args)
    bad[13] = 4
    with pytest.raises(RuntimeError, match="top_k must be in 1..K=3"):
        torch.ops.rims_fast.rim_steps_fwd(*bad, True)
    bad = list(args)
    bad[3] = h0.detach().float()
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.rims_fast.rim_steps_fwd(*bad, True)
    f16 = [a.half() if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a
           for a in args]
    for i in (0, 1, 2):  # the hoisted inputs stay in the compute type
        f16[i] = args[i].float()
    with pytest.raises(RuntimeError, match="CPU implementation .* takes float32 and float64"):
        torch.ops.rims_fast.rim_steps_fwd(*f16, True)


def test_backend_cuda_env_switch(monkeypatch):
    monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "stepped")
    assert rs.cuda_fwd_mode() == "stepped"
    rim, x, h0, c0, P, _ = _setup(*GRID[1])
    with torch.no_grad():  # stepped=None reads the variable: the same op as stepped=True
        env = rs.rim_seq(x, h0, c0, P, rim.config)
        explicit = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
        persistent = rs.rim_seq(x, h0, c0, P, rim.config, stepped=False)
    assert all(torch.equal(a, b) for a, b in zip(env, explicit))
    assert torch.equal(env[3], persistent[3])
    assert_close("stepped vs persistent", env[0], persistent[0], torch.float64)
    from rims_fast import _backend
    assert _backend.runner("cuda") is rs.rim_seq


def test_pdl_env_checked(monkeypatch):
    """RIMS_FAST_CUDA_PDL is 0 (default) or 1; rim_seq checks it before any launch (the stepped
    ops' CUDA launcher reads it), and on CPU tensors it changes nothing."""
    assert not rs.pdl_mode()
    rim, x, h0, c0, P, _ = _setup(*GRID[1])
    with torch.no_grad():
        base = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
        monkeypatch.setenv("RIMS_FAST_CUDA_PDL", "1")
        assert rs.pdl_mode()
        got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
        assert all(torch.equal(a, b) for a, b in zip(got, base) if a is not None)
        for bad in ("2", "yes", ""):
            monkeypatch.setenv("RIMS_FAST_CUDA_PDL", bad)
            with pytest.raises(ValueError, match="RIMS_FAST_CUDA_PDL must be 0 or 1"):
                rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)


def test_graph_mode_env(monkeypatch):
    from rims_fast import rim_seq_graph
    assert not rim_seq_graph.graph_mode()  # opt-in
    monkeypatch.setenv("RIMS_FAST_CUDA_GRAPH", "1")
    assert rim_seq_graph.graph_mode()
    monkeypatch.setenv("RIMS_FAST_CUDA_GRAPH", "yes")
    with pytest.raises(ValueError, match="RIMS_FAST_CUDA_GRAPH must be 0 or 1"):
        rim_seq_graph.graph_mode()
    # CPU tensors never take the graph path, whatever the variable says.
    monkeypatch.setenv("RIMS_FAST_CUDA_GRAPH", "1")
    rim, x, h0, c0, P, _ = _setup(*GRID[1])
    with torch.no_grad():
        got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
    assert not rim_seq_graph._GRAPHS
    assert got[0].shape == (x.shape[0], x.shape[1], rim.config.num_units * rim.config.hidden_size)


# ---- on a GPU: the CUDA phases and cuBLAS -----------------------------------------------------

_GPU = torch.cuda.is_available() and rs.unavailable_reason(torch.device("cuda"), torch.float32) is None


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs a CUDA device and a CUDA build of rims_fast._C")
class TestCUDA:
    @pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:8])))
    def test_equals_host_run(self, case):
        """float64 on the GPU against the host run of the same driver: masks exactly, outputs and
        saved activations to float64 rounding."""
        rim, x, h0, c0, P, _ = _setup_case(case, B=19)
        args = _op_args(x, h0, c0, P, rim.config, 0.3, 0.4, 11)
        host = torch.ops.rims_fast.rim_steps_fwd(*args, True)
        cu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        got = torch.ops.rims_fast.rim_steps_fwd(*cu, True)
        assert torch.equal(got[3].cpu(), host[3])
        for i, (a, b) in enumerate(zip(got, host)):
            if i != 3 and b.numel():
                torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("case", CASES[:2] + CASES[4:6], ids=lambda c: "-".join(map(str, c[:8])))
    def test_backward_equals_host_run(self, case):
        """The CUDA phases of rim_steps_bwd against their host run, float64, dropout on."""
        args = _bwd_args(case, True, False, ("out", "h_n", "c_n"))
        host = torch.ops.rims_fast.rim_steps_bwd(*args)
        cu = [a.cuda() if isinstance(a, torch.Tensor) else
              [s.cuda() for s in a] if isinstance(a, (list, tuple)) else a for a in args]
        got = torch.ops.rims_fast.rim_steps_bwd(*cu)
        for a, b in zip(got, host):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_paper_shape(self, cell, dtype):
        """The paper layer (B=64, T=20) against the float64 reference under the op's masks: the
        output by the tolerance table, the gradients (the stepped backward) by relative norm
        error, as test_rim_seq's."""
        rim, x, h0, c0, P, leaves = _paper_cuda(cell, dtype)
        check_paper_run(rs.rim_seq(x, h0, c0, P, rim.config, stepped=True), rim, leaves, dtype)

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_large_layer(self, cell):
        """The `large` layer (D=512, K=8, H=256) in bfloat16, the shape this path is for:
        forward against the float64 reference under the op's masks, and a backward that runs."""
        torch.manual_seed(0)
        rim = rims_fast.RIM(512, 256, 8, 4, cell=cell, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(3, 32, 1, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        P = dict(rim.named_parameters())
        h0 = torch.randn(32, 8, 256, device="cuda", dtype=torch.bfloat16)
        c0 = torch.randn_like(h0) if cell == "lstm" else None
        got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
        p64 = {n: v.detach().double() for n, v in P.items()}
        want = rims_fast.rim_ref(x.detach().double(), h0.double(),
                                 c0.double() if c0 is not None else None, p64, rim.config,
                                 masks=got[3])
        assert_close("out", got[0], want[0], torch.bfloat16)
        got[0].float().square().sum().backward()
        assert torch.isfinite(x.grad).all()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_cuda_graph_capture(self, dtype):
        """No host sync and no allocation the caching allocator cannot replay: a captured CUDA
        graph of the stepped forward replays to the eager result, also on new inputs."""
        torch.manual_seed(0)
        rim = rims_fast.RIM(64, 100, 6, 4, device="cuda", dtype=dtype)
        P = {n: p.detach() for n, p in rim.named_parameters()}
        x = torch.randn(20, 64, 1, 64, device="cuda", dtype=dtype)
        h0 = torch.randn(64, 6, 100, device="cuda", dtype=dtype)
        c0 = torch.randn(64, 6, 100, device="cuda", dtype=dtype)
        check_graph_capture(lambda: rs.rim_seq(x, h0, c0, P, rim.config, stepped=True), x)

    @pytest.mark.parametrize("stepped", [True, False], ids=["stepped", "persistent"])
    def test_graph_replay(self, monkeypatch, stepped):
        """RIMS_FAST_CUDA_GRAPH=1: the no-grad forward replays a captured graph, bit-identical
        to eager launches, on new inputs, after an in-place parameter update (read in place), and
        a parameter with new storage makes a new capture."""
        from rims_fast import rim_seq_graph
        torch.manual_seed(0)
        rim = rims_fast.RIM(64, 100, 6, 4, device="cuda", dtype=torch.bfloat16)
        P = {n: p.detach() for n, p in rim.named_parameters()}
        x = torch.randn(20, 64, 1, 64, device="cuda", dtype=torch.bfloat16)
        h0 = torch.randn(64, 6, 100, device="cuda", dtype=torch.bfloat16)
        c0 = torch.randn_like(h0)
        run = lambda: rs.rim_seq(x, h0, c0, P, rim.config, stepped=stepped)  # noqa: E731
        with torch.no_grad():
            eager = run()
            monkeypatch.setenv("RIMS_FAST_CUDA_GRAPH", "1")
            rim_seq_graph._GRAPHS.clear()
            for _ in range(2):  # capture, then replay
                for a, b in zip(run(), eager):
                    assert torch.equal(a, b)
            assert len(rim_seq_graph._GRAPHS) == 1
            x.copy_(torch.randn_like(x))
            P["weight_hh"].mul_(0.5)
            replayed = run()
            monkeypatch.setenv("RIMS_FAST_CUDA_GRAPH", "0")
            for a, b in zip(replayed, run()):
                assert torch.equal(a, b)
            monkeypatch.setenv("RIMS_FAST_CUDA_GRAPH", "1")
            P["weight_hh"] = P["weight_hh"].clone()
            run()
            assert len(rim_seq_graph._GRAPHS) == 2

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_pdl_changes_nothing(self, monkeypatch, cell):
        """RIMS_FAST_CUDA_PDL=1 (programmatic dependent launch, sm_90+; refused below): the same
        kernels, so outputs, masks and every gradient bit-identical to ordinary launches, and a
        captured graph of the PDL launches replays to the eager result. The wait at each phase
        kernel's start is what makes this hold: without it a phase could read its GEMM's output
        before the GEMM finished, and the outputs would differ from run to run."""
        if torch.cuda.get_device_capability()[0] < 9:
            monkeypatch.setenv("RIMS_FAST_CUDA_PDL", "1")
            rim, x, h0, c0, P, _ = _paper_cuda(cell, torch.bfloat16)
            with pytest.raises(RuntimeError, match="needs compute capability 9.0"):
                rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
            return
        res = {}
        for pdl in ("0", "1"):
            monkeypatch.setenv("RIMS_FAST_CUDA_PDL", pdl)
            rim, x, h0, c0, P, leaves = _paper_cuda(cell, torch.bfloat16)
            got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
            res[pdl] = ([g.detach() if g is not None else None for g in got],
                        _grads(got[:3], leaves))
        (a, ga), (b, gb) = res["0"], res["1"]
        for u, v in zip(a, b):
            assert (u is None) == (v is None) and (u is None or torch.equal(u, v))
        for name in ga:
            assert torch.equal(ga[name], gb[name]), "d" + name
        P = {n: p.detach() for n, p in rim.named_parameters()}
        x, h0 = x.detach(), h0.detach()
        c0 = c0.detach() if c0 is not None else None
        check_graph_capture(lambda: rs.rim_seq(x, h0, c0, P, rim.config, stepped=True), x)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_fused_paper_shape(self, monkeypatch, cell, dtype):
        """RIMS_FAST_CUDA_FUSED=1 on the GPU (the WMMA gates + cell and output + residual
        kernels; GRU: the output kernel): the paper layer against the float64 reference under
        the op's masks, gradients through the stepped backward, as test_paper_shape; then graph
        capture and replay."""
        monkeypatch.setenv("RIMS_FAST_CUDA_FUSED", "1")
        rim, x, h0, c0, P, leaves = _paper_cuda(cell, dtype)
        check_paper_run(rs.rim_seq(x, h0, c0, P, rim.config, stepped=True), rim, leaves, dtype)
        P = {n: p.detach() for n, p in rim.named_parameters()}
        x, h0 = x.detach(), h0.detach()
        c0 = c0.detach() if c0 is not None else None
        check_graph_capture(lambda: rs.rim_seq(x, h0, c0, P, rim.config, stepped=True), x)

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_fused_large_layer(self, monkeypatch, cell):
        """The `large` layer (H = 256: 32 gate tiles, four blocks per mechanism, kd = 768; eight
        32-unit output tiles) with the fused kernels, bfloat16, against the float64 reference
        under its masks."""
        monkeypatch.setenv("RIMS_FAST_CUDA_FUSED", "1")
        self.test_large_layer(cell)

    def test_fused_skips_float32(self, monkeypatch):
        """A float32 layer with RIMS_FAST_CUDA_FUSED=1 runs the GEMM path (warned once; the
        tensor-core kernels take 16-bit operands): bit-identical to the switch unset."""
        rim, x, h0, c0, P, _ = _paper_cuda("lstm", torch.float32)
        with torch.no_grad():
            want = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
            monkeypatch.setenv("RIMS_FAST_CUDA_FUSED", "1")
            got = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
        for a, b in zip(got, want):
            assert torch.equal(a, b)

    def test_module_backend_cuda_stepped(self, monkeypatch):
        monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "stepped")
        rim = rims_fast.RIM(5, 3, 4, 2, backend="cuda").cuda()
        x = torch.randn(6, 4, 5, device="cuda")
        out, _ = rim(x)
        rim.backend = "torch"
        ref, _ = rim(x)
        assert_close("out", out, ref, torch.float32)


def test_tf32_setting_read_with_either_api():
    """The graph caches' keys and the Triton float32 dot precision read the TF32 setting; after
    PyTorch's new API set it, reading the legacy flag raises, so they must not."""
    from rims_fast import _backend
    m = torch.backends.cuda.matmul
    if getattr(m, "fp32_precision", None) is None:
        pytest.skip("this torch has only the legacy TF32 flag")
    old = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        assert _backend.tf32_matmul()
        m.fp32_precision = "ieee"
        assert not _backend.tf32_matmul()
    finally:
        m.fp32_precision = old


# Wide enough that the stepped select reads the q rows and the keys from global memory instead
# of staging them (neither fits its 15 KB in float64: K*nk = M*nk = 8*256 elements), as does
# select_bwd the saved queries; that comm and comm_bwd read the Q|K|V rows, d o rows,
# probabilities and score gradients from global memory (K*C3 = 16*768, K*cv = 16*256, K*n_c*K =
# 16*8*16 elements, each over 15 KB in float64; comm then applies the dropout at its read); and
# that select reads the input row, and select_bwd a~, the score gradients, their partial sums and
# the input row, from global memory (K*n_in*M = 8*4*64, M*xrow = 64*1024).
UNSTAGED = [("lstm", 8, 4, 1, 8, 3, 2, 3, dict(input_key_size=64)),
            ("lstm", 1, 1, 8, 16, 4, 2, 3, dict(comm_key_size=32, comm_value_size=32)),
            ("lstm", 64, 4, 1, 8, 3, 2, 256, dict(input_key_size=8))]


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("case", UNSTAGED, ids=["select", "comm_bwd", "select_bwd"])
def test_stepped_unstaged_inputs(case, dropout):
    rim = _setup_case(case)[0]
    c, M = rim.config, case[1]
    ck, cv = c.comm_heads * c.comm_key_size, c.comm_heads * c.comm_value_size
    nk, K = c.input_heads * c.input_key_size, c.num_units
    sizes = {"q": K * nk, "keys": M * nk, "comm Q|K|V": K * (2 * ck + cv),
             "comm probs": K * c.comm_heads * K, "a~": K * c.input_heads * M}
    assert max(sizes.values()) * 8 > 15 * 1024, sizes
    test_stepped_matches_reference_float64(case)
    test_saved_activations_are_the_persistent_forwards(case, dropout)
    test_backward_equals_the_persistent_backward(case, dropout, not dropout, ("out", "h_n", "c_n"))
