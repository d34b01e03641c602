"""``rims_fast::rim_seq_fwd`` / ``rim_seq_bwd`` (the persistent whole-sequence CUDA kernels)
against ``rim_ref``.

Without a GPU the ops' CPU implementations run the kernels' tile functions on the host (the same
code as the device, barriers trivially satisfied), so these tests check the kernels' arithmetic
in CI: outputs, final states, masks (exactly), every gradient (the backward kernel's sweep plus
the weight-gradient GEMMs), dropout (the C++ driver's stream, replayed), tiles of 1, 3 and 8
samples, folded and per-head input terms. The ``gpu`` tests run the CUDA kernels themselves.
"""

from __future__ import annotations

import pytest
import torch

import rims_fast
from helpers import assert_close, make_rim, random_state
from rims_fast import rim_cpu as rc
from rims_fast import rim_seq as rs

_WHY = rs.unavailable_reason(torch.device("cpu"), torch.float64)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"rim_seq_fwd not built: {_WHY}")

PARAMS = rs.PARAM_NAMES

# (cell, M, input_heads, comm_heads, K, top_k, T, input_value_size); H = 3, D = 5 (make_rim).
# M * D <= d_v folds the input term (the kernel reads x); above, it reads per-head values.
GRID = [
    ("lstm", 1, 2, 2, 4, 2, 5, 3),    # per-head values (M*D = 5 > 3)
    ("lstm", 1, 1, 1, 4, 2, 5, 8),    # folded (5 <= 8)
    ("lstm", 3, 2, 2, 4, 1, 4, 3),    # top_k = 1, per-head values
    ("lstm", 2, 1, 2, 5, 5, 1, 16),   # top_k = K, T = 1, folded
    ("gru", 1, 1, 1, 4, 2, 5, 8),     # folded
    ("gru", 3, 2, 2, 4, 2, 4, 3),     # per-head values
    ("gru", 1, 2, 1, 3, 3, 3, 4),     # top_k = K, per-head values
]

# Larger phases than the grid's (H = 3, B = 5): H = 24, K = 6, 3-4 heads of wider keys, B = 11
# (tile 8: a full and a partial tile), so that phases have hundreds of items.
WIDE = [("lstm", 2, 3, 4, 6, 3, 3, 4), ("gru", 1, 2, 3, 6, 4, 3, 16)]
WIDE_SETUP = dict(B=11, hidden_size=24, input_key_size=8, comm_key_size=6, comm_value_size=5)


def _setup(cell, M, n_in, n_c, K, top_k, T, dv, dtype=torch.float64, B=5, seed=0, **kw):
    rim = make_rim(seed=seed, cell=cell, num_units=K, top_k=top_k, input_heads=n_in,
                   comm_heads=n_c, input_value_size=dv, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(T, B, M, rim.input_size, generator=g, dtype=dtype).requires_grad_(True)
    st = random_state(rim, B, dtype=dtype, seed=seed + 1)
    h0, c0 = st if cell == "lstm" else (st, None)
    h0.requires_grad_(True)
    if c0 is not None:
        c0.requires_grad_(True)
    P = dict(rim.named_parameters())
    leaves = {"x": x, "h0": h0, **({"c0": c0} if c0 is not None else {}), **P}
    return rim, x, h0, c0, P, leaves


def _grads(outputs, leaves, seed=3):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device))
               .sum() for o in outputs if o is not None)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (gr if gr is not None else torch.zeros_like(v))
            for (n, v), gr in zip(leaves.items(), grads)}


def _compare(got, want, leaves, dtype, leaves_want=None):
    assert torch.equal(got[3], want[3]), "masks differ"
    for name, a, b in zip(("out", "h_n", "c_n"), got[:3], want[:3]):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype
        assert_close(name, a, b, dtype)
    g_got = _grads(got[:3], leaves)
    g_want = _grads(want[:3], leaves_want if leaves_want is not None else leaves)
    for name in leaves:
        assert_close("d" + name, g_got[name], g_want[name], dtype,
                     "grad_w" if name in PARAMS else "grad_in")


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("tile", [1, 2, 3, 0])  # 1, 2: the wide kernels' forward code
def test_host_run_matches_reference_float64(case, tile):
    rim, x, h0, c0, P, leaves = _setup(*case)
    got = rs.rim_seq(x, h0, c0, P, rim.config, tile=tile)
    _compare(got, rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, torch.float64)


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("tile", [1, 3])
@pytest.mark.parametrize("xw", [0, 1], ids=["F", "hoisted"])
def test_host_run_xw_matches_reference_float64(case, tile, xw):
    """Both input-term paths of the forward (RIMS_FAST_CUDA_XW: F read per step, or x F hoisted
    out of the recurrence), every output and gradient against the reference."""
    rim, x, h0, c0, P, leaves = _setup(*case)
    got = rs.rim_seq(x, h0, c0, P, rim.config, tile=tile, xw=xw)
    _compare(got, rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, torch.float64)


@pytest.mark.parametrize("case", WIDE, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("tile,mma,xw", [(8, False, 0), (8, False, 1), (8, True, 0)])
def test_host_run_wide_matches_reference_float64(case, tile, mma, xw):
    """Tile 8 over B = 11 (a full tile and a partial one) with H = 24: phases of hundreds of
    items (tests/test_host_item_order.py reruns these in other item orders)."""
    rim, x, h0, c0, P, leaves = _setup(*case, **WIDE_SETUP)
    got = rs.rim_seq(x, h0, c0, P, rim.config, tile=tile, mma=mma, xw=xw)
    _compare(got, rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, torch.float64)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tile", [8, 1])
def test_host_run_many_rows_matches_reference_float64(cell, tile):
    """K = 9 over tiles of 8 samples: more than 64 (sample, mechanism) rows, where the phases
    that skip mechanisms no sample runs (RunMechs) take every mechanism instead; tile 1 skips."""
    rim, x, h0, c0, P, leaves = _setup(cell, 1, 1, 1, 9, 3, 3, 8, B=11)
    got = rs.rim_seq(x, h0, c0, P, rim.config, tile=tile)
    _compare(got, rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, torch.float64)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "folded"])
def test_host_run_xw_saved_and_dropout(cell, per_head):
    """The op with both dropouts, save=True: the hoisted input term's 13 outputs (the 9 saved
    histories included) equal F's to float64 round-off (the same sums reassociated: a (x F)
    for (a x) F), the masks exactly; with clusters, bit for bit the single block's."""
    args = _op_args(cell, 0.3, 0.4, dv=3 if per_head else 16)
    assert args[16] == per_head
    base = torch.ops.rims_fast.rim_seq_fwd(*args, False, 0, -1, 0)
    got = torch.ops.rims_fast.rim_seq_fwd(*args, False, 0, -1, 1)
    assert len(got) == 13 and got[4].numel() > 0
    assert torch.equal(got[3], base[3]), "masks"
    for i, (a, b) in enumerate(zip(got, base)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"output {i}: {m}")
    for kpr in (2, 3):
        cl = torch.ops.rims_fast.rim_seq_fwd(*args, False, kpr, -1, 1)
        for i, (a, b) in enumerate(zip(cl, got)):
            assert torch.equal(a, b), (kpr, i)


def test_xw_outside_autocast():
    """The op's own GEMMs (the hoisted input term, forward and backward) run in the compute
    dtype under an active autocast: the kernels read their results as such."""
    f32 = lambda a: a.float() if isinstance(a, torch.Tensor) else a  # noqa: E731
    args = tuple(f32(a) for a in _op_args("lstm", 0.0, 0.0, dv=16))
    want = torch.ops.rims_fast.rim_seq_fwd(*args, False, 0, -1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.ops.rims_fast.rim_seq_fwd(*args, False, 0, -1, 1)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    g = [torch.randn_like(want[0]), None, None]
    bwd = (*g, *args[:13], want[3], want[4:], *args[13:20], True, 3, False, 1)
    want_b = torch.ops.rims_fast.rim_seq_bwd(*bwd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_b = torch.ops.rims_fast.rim_seq_bwd(*bwd)
    for a, b in zip(got_b, want_b):
        assert torch.equal(a, b)


def test_xw_errors_and_env(monkeypatch):
    args = _op_args("lstm", 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"xw \(hoist the input term\) must be -1"):
        torch.ops.rims_fast.rim_seq_fwd(*args, False, 0, -1, 2)
    with pytest.raises(RuntimeError, match="mma=True needs xw=0 or -1"):
        torch.ops.rims_fast.rim_seq_fwd(*args, True, 0, -1, 1)
    torch.library.opcheck(torch.ops.rims_fast.rim_seq_fwd.default, args + (False, 0, -1, 1))
    for v, want in (("auto", -1), ("0", 0), ("1", 1)):
        monkeypatch.setenv("RIMS_FAST_CUDA_XW", v)
        assert rs.xw_mode() == want
    with pytest.raises(ValueError, match="cannot be combined with RIMS_FAST_CUDA_MMA=1"):
        rs.xw_mode(mma=True)
    monkeypatch.setenv("RIMS_FAST_CUDA_XW", "auto")
    assert rs.xw_mode(mma=True) == -1
    monkeypatch.setenv("RIMS_FAST_CUDA_XW", "yes")
    with pytest.raises(ValueError, match="RIMS_FAST_CUDA_XW must be"):
        rs.xw_mode()


# The tensor-core path's tiling (mma=True): operands padded to multiples of 16, products to 32
# columns, 8-row tiles. GRID's H = 3 gives one column tile per product; these add H = 20 (gates
# GH = 80 / GRU 160: several column tiles, the last partial; H padded to 32), an input width of
# 18 (XW padded to 32) and communication sizes whose padded widths all differ (Q|K|V 88 -> 96
# columns, comm_output's 40 rows -> 48), so a stride mixed up between the products shows.
MMA_WIDE = [
    ("lstm", 1, 1, 2, 4, 2, 4, 18, dict(hidden_size=20, comm_key_size=12,
                                        comm_value_size=20)),        # folded, XW = 5
    ("gru", 2, 2, 2, 3, 2, 3, 9, dict(hidden_size=20, input_size=7)),  # per-head, XW = 18
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("tile", [1, 3, 0])
def test_host_run_mma_matches_reference_float64(case, tile):
    """The tensor-core gate products (host side of MmaTile8x32, which also asserts WMMA's
    alignment and leading-dimension rules): outputs, masks and every gradient (the backward reads
    the gates this forward saved) against the reference in float64."""
    rim, x, h0, c0, P, leaves = _setup(*case)
    got = rs.rim_seq(x, h0, c0, P, rim.config, tile=tile, mma=True)
    _compare(got, rims_fast.rim_ref(x, h0, c0, P, rim.config), leaves, torch.float64)


@pytest.mark.parametrize("case", MMA_WIDE, ids=["lstm-H20-folded", "gru-H20-per_head"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_host_run_mma_wide(case, dtype):
    *args, kw = case
    rim, x, h0, c0, P, leaves = _setup(*args, dtype=dtype, B=11, **kw)
    got = rs.rim_seq(x, h0, c0, P, rim.config, mma=True)
    l64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    want = rims_fast.rim_ref(l64["x"], l64["h0"], l64.get("c0"), {n: l64[n] for n in PARAMS},
                             rim.config, masks=got[3])
    _compare(got, want, leaves, dtype, l64)
    plain = rs.rim_seq(x, h0, c0, P, rim.config, mma=False)
    assert torch.equal(plain[3], got[3])


# The cluster variant (cluster = mechanisms per block > 0): the blocks of a tile's cluster run as
# host threads, each with its own shared memory, reading the others' p and K|V through peer()
# after a barrier. Every value is computed by the same item code in the same order as in the
# single-block kernel, so the results must be bit-identical to it (and that kernel is tested
# against the reference above). kpr = 3 with K = 4 or 5 leaves the last block fewer mechanisms.
# Each block keeps only its own rows; its weights are read from shared-memory copies (resident:
# all by default in the host run, none, or a mix) or from global memory.
_MIX = rs.RESIDENT["weight_hh"] | rs.RESIDENT["comm_value"] | rs.RESIDENT["input_query"]


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("kpr", [1, 2, 3])
@pytest.mark.parametrize("tile,resident", [(1, None), (3, None), (3, 0), (1, _MIX)])
def test_host_run_cluster_equals_single_block(case, kpr, tile, resident):
    rim, x, h0, c0, P, leaves = _setup(*case)
    if kpr > rim.config.num_units:
        pytest.skip("kpr > K")
    got = rs.rim_seq(x, h0, c0, P, rim.config, tile=tile, cluster=kpr, resident=resident)
    base = rs.rim_seq(x, h0, c0, P, rim.config, tile=tile, cluster=0)
    for name, a, b in zip(("out", "h_n", "c_n", "masks"), got, base):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b), name
    g_got, g_base = _grads(got[:3], leaves), _grads(base[:3], leaves)
    for name in leaves:  # the backward reads what the cluster blocks saved
        assert torch.equal(g_got[name], g_base[name]), "d" + name


def _op_args(cell, p_in, p_c, dv=3):
    """rim_seq_fwd's arguments up to ``save`` (True) for a K = 7 layer with M = 3, D = 5, tile
    3 (``dv`` >= 15 folds the input term)."""
    rim, x, h0, c0, P, _ = _setup(cell, 3, 2, 2, 7, 3, 4, dv, B=6, input_dropout=p_in,
                                  comm_dropout=p_c)
    cfg = rim.config
    p = {n: t.detach() for n, t in P.items()}
    keys, xsrc, w_x, per_head = rs._hoisted(x.detach(), p, cfg)
    return (keys, xsrc, w_x, h0.detach(), None if c0 is None else c0.detach(),
            *[p[n] for n in rs.OP_WEIGHTS], cfg.top_k, cfg.input_heads, cfg.comm_heads,
            per_head, p_in, p_c, 11, 3, True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tile,cluster,xw", [(1, 0, 0), (3, 0, 1), (1, 0, 1), (3, 2, 1)])
def test_host_run_unsaved_equals_saved(cell, tile, cluster, xw):
    """The forward computes communication queries only for the mechanisms some sample of the
    tile runs (rim_seq_fwd.cuh's RunMechs) and saves inactive rows' queries as zeros: out, h_n,
    c_n and the masks of inference (save=False) are bit for bit the training forward's
    (save=True), with both dropouts, one sample per tile (mechanisms skipped) and three (fewer
    skipped), one block and clusters; the saved queries are zero exactly on inactive rows."""
    args = list(_op_args(cell, 0.3, 0.4, dv=16))
    args[-2] = tile
    saved = torch.ops.rims_fast.rim_seq_fwd(*args, False, cluster, -1, xw)
    args[-1] = False
    got = torch.ops.rims_fast.rim_seq_fwd(*args, False, cluster, -1, xw)
    assert got[4].numel() == 0, "nothing saved"
    assert not torch.all(got[3]), "some mechanisms inactive"
    for i, (a, b) in enumerate(zip(got[:4], saved[:4])):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b), i
    ck = args[9].shape[-1]  # comm_query (K, H, ck)
    q_saved = saved[10][..., :ck]
    assert torch.all(q_saved[~saved[3]] == 0), "inactive rows' queries are saved as zeros"
    assert torch.all(q_saved[saved[3]].abs().sum(-1) > 0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_host_run_cluster_saved_and_dropout(cell):
    """The op itself, training with both dropouts and save=True: all 13 outputs (including the
    9 saved histories each block writes for its own rows) equal the single-block kernel's, for
    K = 7 split 2+2+2+1."""
    args = _op_args(cell, 0.3, 0.4) + (False,)
    base = torch.ops.rims_fast.rim_seq_fwd(*args, 0)
    for resident in (-1, 0, sum(rs.RESIDENT.values()) - _MIX):
        got = torch.ops.rims_fast.rim_seq_fwd(*args, 2, resident)
        assert len(got) == 13 and got[4].numel() > 0
        for i, (a, b) in enumerate(zip(got, base)):
            assert torch.equal(a, b), (resident, i)


def test_cluster_size_limit():
    """At most 8 blocks per cluster (the portable size), on the host run as on the GPU."""
    rim, x, h0, c0, P, _ = _setup("lstm", 1, 1, 1, 9, 2, 2, 8, B=2)
    with pytest.raises(RuntimeError, match="more than the portable cluster size 8"):
        rs.rim_seq(x, h0, c0, P, rim.config, cluster=1)
    got = rs.rim_seq(x, h0, c0, P, rim.config, cluster=2)  # 5 blocks
    base = rs.rim_seq(x, h0, c0, P, rim.config, cluster=0)
    assert torch.equal(got[0], base[0]) and torch.equal(got[3], base[3])


@pytest.mark.parametrize("case", GRID[:3] + GRID[4:6], ids=lambda c: "-".join(map(str, c)))
def test_host_run_float32_against_float64(case):
    rim, x, h0, c0, P, leaves = _setup(*case, dtype=torch.float32)
    got = rs.rim_seq(x, h0, c0, P, rim.config)
    l64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    want = rims_fast.rim_ref(l64["x"], l64["h0"], l64.get("c0"), {n: l64[n] for n in PARAMS},
                             rim.config, masks=got[3])
    _compare(got, want, leaves, torch.float32, l64)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_is_the_cpu_driver_stream(cell):
    """Training with both dropouts: the keep-masks are the C++ driver's for the same seed, the
    reference replays them, and the gradients (recompute) see the same draw."""
    rim, x, h0, c0, P, leaves = _setup(cell, 3, 2, 2, 4, 2, 4, 3, input_dropout=0.3,
                                       comm_dropout=0.4)
    got = rs.rim_seq(x, h0, c0, P, rim.config, training=True, seed=99)
    keep = rc.dropout_masks(99, 4, x.shape[1], 3, rim.config)
    want = rims_fast.rim_ref(x, h0, c0, P, rim.config, training=True, dropout_masks=keep)
    _compare(got, want, leaves, torch.float64)
    if rc.unavailable_reason(torch.device("cpu"), torch.float64) is None:
        drv = rc.rim_cpu_kv(x @ P["input_key"], x @ P["input_value"], h0, c0, P, rim.config,
                            training=True, seed=99)
        assert_close("out vs cpu driver", got[0], drv[0], torch.float64)
    plain = rs.rim_seq(x, h0, c0, P, rim.config, training=False)
    assert (plain[0] - got[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("per_head", [False, True], ids=["folded", "per_head"])
@pytest.mark.parametrize("xw", [0, 1], ids=["F", "hoisted"])
def test_gradcheck(cell, per_head, xw):
    """torch.autograd.gradcheck through the kernels in float64 (random state: no near-ties;
    block_inactive_grad=False so the K|V path of inactive mechanisms is exercised; dropout on),
    both input-term paths."""
    rim, x, h0, c0, P, leaves = _setup(cell, 2, 2, 2, 4, 2, 3, 2 if per_head else 16, B=3,
                                       block_inactive_grad=False, input_dropout=0.25,
                                       comm_dropout=0.25)
    assert rs._hoisted(x, P, rim.config)[3] == per_head  # M*D = 10 vs d_v = 2 or 16
    names = list(leaves)

    def f(*tensors):
        d = dict(zip(names, tensors))
        out, h_n, c_n, _ = rs.rim_seq(d["x"], d["h0"], d.get("c0"), {n: d[n] for n in PARAMS},
                                      rim.config, training=True, seed=17, xw=xw)
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()), eps=1e-6, atol=1e-7)


def test_opcheck_and_errors():
    rim, x, h0, c0, P, _ = _setup("lstm", 2, 2, 2, 3, 2, 2, 3, B=2)
    cfg = rim.config
    p = {n: t.detach() for n, t in P.items()}
    keys, xsrc, w_x, per_head = rs._hoisted(x.detach(), p, cfg)
    args = (keys, xsrc, w_x, h0.detach(), c0.detach(), p["input_query"], p["weight_hh"],
            p["bias_ih"], p["bias_hh"], p["comm_query"], p["comm_key"], p["comm_value"],
            p["comm_output"], cfg.top_k, cfg.input_heads, cfg.comm_heads, per_head, 0.0, 0.0, 0,
            0, True)
    torch.library.opcheck(torch.ops.rims_fast.rim_seq_fwd.default, args)
    torch.library.opcheck(torch.ops.rims_fast.rim_seq_fwd.default, args + (True,))  # mma
    sizes, cell, p_in, p_c, big = rims_fast._config.cfg_args(cfg)
    # Leaves of their own: the raw ops' checks below must not see inputs that require grad
    # (opcheck would backprop through an op with no autograd kernel, which torch warns about).
    weights = [p[n].detach().requires_grad_(True) for n in rs.OP_WEIGHTS]
    torch.library.opcheck(rs.rim_seq_op, (keys.detach().requires_grad_(True), xsrc, w_x,
                                          h0.detach().requires_grad_(True), c0.detach(), weights,
                                          sizes, cell, 0.2, 0.3, big, per_head, 5, 0, True,
                                          False, 0, -1, -1, False))
    torch.library.opcheck(torch.ops.rims_fast.rim_seq_fwd.default, args + (False, 2))  # cluster
    torch.library.opcheck(torch.ops.rims_fast.rim_seq_fwd.default, args + (False, 2, 5))
    with pytest.raises(RuntimeError, match=r"must be -1 \(auto\) or in 0..127, got 128"):
        torch.ops.rims_fast.rim_seq_fwd(*args, False, 1, 128)
    with pytest.raises(RuntimeError, match="resident weights need cluster > 0"):
        torch.ops.rims_fast.rim_seq_fwd(*args, False, 0, 1)
    bad = list(args)
    bad[-2] = 9
    with pytest.raises(RuntimeError, match="tile must be in 0..8"):
        torch.ops.rims_fast.rim_seq_fwd(*bad)
    with pytest.raises(RuntimeError, match=r"cluster \(mechanisms per block of a cluster\) must"):
        torch.ops.rims_fast.rim_seq_fwd(*args, False, 4)  # K = 3
    with pytest.raises(RuntimeError, match="mma=True needs cluster=0"):
        torch.ops.rims_fast.rim_seq_fwd(*args, True, 1)
    bad = list(args)
    bad[13] = 4
    with pytest.raises(RuntimeError, match="top_k must be in 1..K=3"):
        torch.ops.rims_fast.rim_seq_fwd(*bad)
    bad = list(args)
    bad[1] = xsrc[..., :-1]
    with pytest.raises(RuntimeError, match="does not match w_x"):
        torch.ops.rims_fast.rim_seq_fwd(*bad)
    bad = list(args)
    bad[3] = h0.detach().float()
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.rims_fast.rim_seq_fwd(*bad)


def test_cuda_auto_mode_picks_by_weights(monkeypatch, caplog):
    """RIMS_FAST_CUDA_FWD=auto (the default): the persistent kernels for the `paper` layer, the
    stepped ops for `large` (the two timed configs the threshold sits between), said once per
    layer shape on the rims_fast logger; the explicit modes override it."""
    monkeypatch.delenv("RIMS_FAST_CUDA_FWD", raising=False)
    assert rs.cuda_fwd_mode() == "auto"
    paper = rims_fast.RIM(64, 100, 6, 4).config
    large = rims_fast.RIM(512, 256, 8, 4).config
    assert rs.step_weights(paper, rs.input_rows(paper, 1, 64)) == 739_200
    assert rs.step_weights(large, rs.input_rows(large, 1, 512)) == 7_471_104
    rs._logged_choices.clear()
    with caplog.at_level("INFO", logger="rims_fast"):
        assert not rs.use_stepped(paper, 64)
        assert rs.use_stepped(large, 512)
        assert rs.use_stepped(large, 512)  # logged once
    lines = [r.getMessage() for r in caplog.records if "RIMS_FAST_CUDA_FWD=auto" in r.getMessage()]
    assert len(lines) == 2 and "persistent kernels" in lines[0] and "stepped ops" in lines[1], lines
    monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "persistent")
    assert not rs.use_stepped(large, 512)
    monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "stepped")
    assert rs.use_stepped(paper, 64)


def test_auto_reruns_on_stepped_when_shared_memory_is_short(monkeypatch, caplog):
    """RIMS_FAST_CUDA_FWD=auto: a layer the weight count gives to the persistent kernels but whose
    sample does not fit their shared memory (the launcher's error, faked here: host runs have no
    such limit) reruns on the stepped ops with a warning, with the same result as asking for them;
    any other error, or an explicit mode, raises."""
    monkeypatch.delenv("RIMS_FAST_CUDA_FWD", raising=False)
    rim, x, h0, c0, P, _ = _setup(*GRID[0])
    real = rs.rim_seq_op
    calls = []

    def fake(*args):
        calls.append(args[-1])
        if not args[-1]:  # stepped
            raise RuntimeError(f"rims_fast::rim_seq: one sample needs 300000 {rs.SMEM_ERROR}, more "
                               "than this GPU's 232448 per block")
        return real(*args)

    monkeypatch.setattr(rs, "rim_seq_op", fake)
    with caplog.at_level("WARNING", logger="rims_fast"):
        got = rs.rim_seq(x, h0, c0, P, rim.config)
    assert calls == [False, True]
    assert any("does not fit the persistent kernels" in r.getMessage() for r in caplog.records)
    want = rs.rim_seq(x, h0, c0, P, rim.config, stepped=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "persistent")
    with pytest.raises(RuntimeError, match=rs.SMEM_ERROR):
        rs.rim_seq(x, h0, c0, P, rim.config)
    monkeypatch.delenv("RIMS_FAST_CUDA_FWD")

    def other(*args):
        raise RuntimeError("something else")

    monkeypatch.setattr(rs, "rim_seq_op", other)
    with pytest.raises(RuntimeError, match="something else"):
        rs.rim_seq(x, h0, c0, P, rim.config)


def test_backend_cuda_env_switch(monkeypatch):
    monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "bogus")
    with pytest.raises(ValueError, match="RIMS_FAST_CUDA_FWD"):
        rs.cuda_fwd_mode()
    monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "persistent")
    assert rs.cuda_fwd_mode() == "persistent"
    monkeypatch.setenv("RIMS_FAST_CUDA_TILE", "9")
    with pytest.raises(ValueError, match="RIMS_FAST_CUDA_TILE"):
        rs.tile_size()
    monkeypatch.setenv("RIMS_FAST_CUDA_TILE", "3")
    assert rs.tile_size() == 3
    monkeypatch.setenv("RIMS_FAST_CUDA_MMA", "yes")
    with pytest.raises(ValueError, match="RIMS_FAST_CUDA_MMA"):
        rs.mma_mode(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setenv("RIMS_FAST_CUDA_MMA", "1")
    assert rs.mma_mode(torch.device("cuda"), torch.bfloat16)
    assert not rs.mma_mode(torch.device("cuda"), torch.float32)  # CUDA cores for fp32
    assert not rs.mma_mode(torch.device("cpu"), torch.float16)
    monkeypatch.delenv("RIMS_FAST_CUDA_MMA")
    assert not rs.mma_mode(torch.device("cuda"), torch.bfloat16)  # opt-in
    assert rs.cluster_mechs(torch.device("cuda"), 6, False) == 0  # opt-in
    monkeypatch.setenv("RIMS_FAST_CUDA_CLUSTER", "2")
    with pytest.raises(ValueError, match="RIMS_FAST_CUDA_CLUSTER must be 0 or 1"):
        rs.cluster_mechs(torch.device("cuda"), 6, False)
    monkeypatch.setenv("RIMS_FAST_CUDA_CLUSTER", "1")
    assert rs.cluster_mechs(torch.device("cuda"), 6, False) == 1  # one mechanism per block
    assert rs.cluster_mechs(torch.device("cuda"), 12, False) == 2  # <= 8 blocks
    monkeypatch.setenv("RIMS_FAST_CUDA_CLUSTER_BLOCKS", "2")
    assert rs.cluster_mechs(torch.device("cuda"), 6, False) == 3  # 2 blocks of 3
    assert rs.cluster_mechs(torch.device("cuda"), 5, False) == 3  # 2 blocks: 3 + 2
    monkeypatch.setenv("RIMS_FAST_CUDA_CLUSTER_BLOCKS", "4")
    assert rs.cluster_mechs(torch.device("cuda"), 6, False) == 2  # ceil(6 / 2) = 3 blocks
    assert rs.cluster_mechs(torch.device("cuda"), 3, False) == 1  # never more blocks than K
    monkeypatch.setenv("RIMS_FAST_CUDA_CLUSTER_BLOCKS", "1")
    assert rs.cluster_mechs(torch.device("cuda"), 6, False) == 6  # a cluster of one block
    for bad in ("0", "9", "two", ""):
        monkeypatch.setenv("RIMS_FAST_CUDA_CLUSTER_BLOCKS", bad)
        with pytest.raises(ValueError, match="RIMS_FAST_CUDA_CLUSTER_BLOCKS must be"):
            rs.cluster_mechs(torch.device("cuda"), 6, False)
    monkeypatch.delenv("RIMS_FAST_CUDA_CLUSTER_BLOCKS")
    assert rs.cluster_mechs(torch.device("cpu"), 6, False) == 0
    with pytest.raises(ValueError, match="cannot be combined with RIMS_FAST_CUDA_MMA"):
        rs.cluster_mechs(torch.device("cuda"), 6, True)
    assert rs.resident_mode() == -1  # weights in shared memory as they fit
    monkeypatch.setenv("RIMS_FAST_CUDA_RESIDENT", "0")
    assert rs.resident_mode() == 0
    monkeypatch.setenv("RIMS_FAST_CUDA_RESIDENT", "auto")
    with pytest.raises(ValueError, match="RIMS_FAST_CUDA_RESIDENT must be 0 or 1"):
        rs.resident_mode()


# ---- on a GPU: the CUDA kernel itself ---------------------------------------------------------

def _paper_cuda(cell, dtype):
    """The paper layer on the GPU (B=64, T=20, D=64, K=6, top_k=4, H=100, default heads) with a
    random state, every input requiring grad: rim, x, h0, c0, params, leaves."""
    torch.manual_seed(0)
    rim = rims_fast.RIM(64, 100, 6, 4, cell=cell, dtype=dtype, device="cuda")
    x = torch.randn(20, 64, 1, 64, device="cuda", dtype=dtype, requires_grad=True)
    P = dict(rim.named_parameters())
    h0 = torch.randn(64, 6, 100, device="cuda", dtype=dtype, requires_grad=True)
    c0 = torch.randn_like(h0).requires_grad_(True) if cell == "lstm" else None
    leaves = {"x": x, "h0": h0, **({"c0": c0} if c0 is not None else {}), **P}
    return rim, x, h0, c0, P, leaves


def check_paper_run(got, rim, leaves, dtype):
    """A run of :func:`_paper_cuda`'s layer against the float64 reference under its own masks:
    the output by the tolerance table, every gradient by relative norm error (bounds per dtype
    below: weight gradients sum B*T terms, so the elementwise table is not the yardstick)."""
    l64 = {n: v.detach().double().requires_grad_(True) for n, v in leaves.items()}
    want = rims_fast.rim_ref(l64["x"], l64["h0"], l64.get("c0"), {n: l64[n] for n in PARAMS},
                             rim.config, masks=got[3])
    assert_close("out", got[0], want[0], dtype)
    assert got[3].sum(-1).eq(rim.config.top_k).all()
    bound = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    g_got, g_want = _grads(got[:3], leaves), _grads(want[:3], l64)
    for name in leaves:
        a, b = g_got[name].double(), g_want[name]
        rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        print(f"d{name}: relative norm error {rel:.2e} (bound {bound:g})")
        assert rel <= bound, name


def check_graph_capture(run, x):
    """``run()`` (no grad, reading ``x``) captured in a CUDA graph replays to the eager result,
    also after new values are copied into ``x``."""
    with torch.no_grad():
        eager = run()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()
        graph.replay()
        for a, b in zip(captured, eager):
            assert (a is None and b is None) or torch.equal(a, b)
        x.copy_(torch.randn_like(x))
        graph.replay()
        again = run()
        for a, b in zip(captured, again):
            assert (a is None and b is None) or torch.equal(a, b)


_GPU = torch.cuda.is_available() and rs.unavailable_reason(torch.device("cuda"), torch.float32) is None


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs a CUDA device and a CUDA build of rims_fast._C")
class TestCUDA:
    @pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
    @pytest.mark.parametrize("xw", [0, 1], ids=["F", "hoisted"])
    def test_kernel_equals_host_run(self, case, xw):
        """float64 on the GPU against the host run of the same tile function, and the reference;
        both input-term paths (RIMS_FAST_CUDA_XW)."""
        rim, x, h0, c0, P, leaves = _setup(*case, B=19)
        host = rs.rim_seq(x, h0, c0, P, rim.config, xw=xw)
        cu = {n: v.detach().cuda().requires_grad_(True) for n, v in leaves.items()}
        Pc = {n: cu[n] for n in PARAMS}
        got = rs.rim_seq(cu["x"], cu["h0"], cu.get("c0"), Pc, rim.config, xw=xw)
        assert torch.equal(got[3].cpu(), host[3])
        for a, b in zip(got[:3], host[:3]):
            if b is not None:
                assert_close("cuda vs host", a.cpu(), b, torch.float64)
        want = rims_fast.rim_ref(cu["x"], cu["h0"], cu.get("c0"), Pc, rim.config)
        _compare(got, want, cu, torch.float64)

    @pytest.mark.parametrize("mma", [False, True], ids=["cuda_cores", "tensor_cores"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_paper_shape(self, cell, dtype, mma):
        """B=64, T=20, D=64, K=6, top_k=4, H=100 (the paper layer, default heads) against the
        float64 reference under the kernel's masks: the output elementwise (tolerance table),
        every gradient by relative norm error (bounds per dtype below: weight gradients sum
        B*T terms, so the elementwise table is not the right yardstick here). mma: the gate
        products on tensor cores (float16/bfloat16 only)."""
        if mma and dtype == torch.float32:
            pytest.skip("the tensor-core path takes float16/bfloat16 (tested to raise below)")
        rim, x, h0, c0, P, leaves = _paper_cuda(cell, dtype)
        check_paper_run(rs.rim_seq(x, h0, c0, P, rim.config, mma=mma), rim, leaves, dtype)

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_mma_large_layer(self, cell):
        """The `large` layer (D=512, K=8, H=256) in bfloat16 on tensor cores: one sample's
        activations plus the tensor-core scratch fit a block (tile of 1), forward and backward
        run, and the output matches the float64 reference under the kernel's masks."""
        torch.manual_seed(0)
        rim = rims_fast.RIM(512, 256, 8, 4, cell=cell, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(3, 5, 1, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        P = dict(rim.named_parameters())
        h0 = torch.randn(5, 8, 256, device="cuda", dtype=torch.bfloat16)
        c0 = torch.randn_like(h0) if cell == "lstm" else None
        got = rs.rim_seq(x, h0, c0, P, rim.config, mma=True)
        p64 = {n: v.detach().double() for n, v in P.items()}
        want = rims_fast.rim_ref(x.detach().double(), h0.double(),
                                 c0.double() if c0 is not None else None, p64, rim.config,
                                 masks=got[3])
        assert_close("out", got[0], want[0], torch.bfloat16)
        got[0].float().square().sum().backward()
        assert torch.isfinite(x.grad).all()

    # 6 blocks of 1; 2 of 3 (RIMS_FAST_CUDA_CLUSTER_BLOCKS=2); blocks of 4 and 2 mechanisms
    @pytest.mark.parametrize("kpr", [1, 3, 4])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_cluster_paper_shape(self, cell, dtype, kpr):
        """The cluster forward (thread-block clusters, sm_90+: one mechanism per block, p and K|V
        exchanged through distributed shared memory) at the paper layer against the single-block
        kernel: the same masks, outputs within the dtype's tolerance (the same item code, but a
        separate compilation), and the backward from the histories the cluster's blocks saved.
        The blocks' weights as many as fit in shared memory (the default) or none there: the
        same kernel and arithmetic, so bit-identical."""
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("thread-block clusters need compute capability 9.0+")
        rim, x, h0, c0, P, leaves = _paper_cuda(cell, dtype)
        got = rs.rim_seq(x, h0, c0, P, rim.config, cluster=kpr)
        with torch.no_grad():
            unresident = rs.rim_seq(x, h0, c0, P, rim.config, cluster=kpr, resident=0)
        for a, b in zip(got, unresident):
            assert (a is None and b is None) or torch.equal(a, b)
        base = rs.rim_seq(x, h0, c0, P, rim.config, cluster=0)
        assert torch.equal(got[3], base[3])
        for name, a, b in zip(("out", "h_n", "c_n"), got[:3], base[:3]):
            if b is not None:
                assert_close(name, a, b, dtype)
        g_got, g_base = _grads(got[:3], leaves), _grads(base[:3], leaves)
        for name in leaves:
            assert_close("d" + name, g_got[name], g_base[name], dtype,
                         "grad_w" if name in PARAMS else "grad_in")

    def test_mma_rejects_float32(self):
        rim, x, h0, c0, P, _ = _setup("lstm", 1, 1, 1, 4, 2, 3, 8, dtype=torch.float32)
        with pytest.raises(RuntimeError, match="takes float16 or bfloat16"):
            rs.rim_seq(x.cuda(), h0.cuda(), c0.cuda(), {n: v.cuda() for n, v in P.items()},
                       rim.config, mma=True)

    @pytest.mark.parametrize("dtype,mma,cluster", [(torch.float32, False, 0),
                                                   (torch.bfloat16, True, 0),
                                                   (torch.float32, False, 1)],
                             ids=["f32", "bf16-tensor_cores", "f32-cluster"])
    def test_cuda_graph_capture(self, dtype, mma, cluster):
        """The persistent forward has no host sync: a captured CUDA graph of it replays to the
        eager result, also after new inputs are copied into the captured buffers."""
        if cluster and torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("thread-block clusters need compute capability 9.0+")
        kw = dict(mma=mma, cluster=cluster)
        torch.manual_seed(0)
        rim = rims_fast.RIM(64, 100, 6, 4, device="cuda", dtype=dtype)
        P = {n: p.detach() for n, p in rim.named_parameters()}
        x = torch.randn(20, 64, 1, 64, device="cuda", dtype=dtype)
        h0 = torch.randn(64, 6, 100, device="cuda", dtype=dtype)
        c0 = torch.randn(64, 6, 100, device="cuda", dtype=dtype)
        check_graph_capture(lambda: rs.rim_seq(x, h0, c0, P, rim.config, **kw), x)

    def test_module_backend_cuda_persistent(self, monkeypatch):
        monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "persistent")
        rim = make_rim(backend="cuda", dtype=torch.float32).cuda()
        x = torch.randn(6, 4, 5, device="cuda")
        out, _ = rim(x)
        rim.backend = "torch"
        ref, _ = rim(x)
        assert_close("out", out, ref, torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
    def test_wide_equals_narrow(self, monkeypatch, dtype):
        """At tiles 1 and 2 the 512-thread kernels (RIMS_FAST_CUDA_WIDE=1, the default; the
        forward's at tile 2, the backward's at tile 1) give the 256-thread kernels' outputs and
        gradients bit for bit, both input-term paths, and the cluster forward's at tile 1
        (sm_90+)."""
        runs = [(0, 1, 0), (1, 1, 0), (0, 2, 0), (1, 2, 0)]
        if torch.cuda.get_device_capability()[0] >= 9:
            runs.append((1, 1, 2))
        for xw, tile, cluster in runs:
            rim, x, h0, c0, P, leaves = _setup(*GRID[0], B=19, dtype=dtype)
            cu = {n: v.detach().cuda().requires_grad_(True) for n, v in leaves.items()}
            Pc = {n: cu[n] for n in PARAMS}
            res = {}
            for wide in ("0", "1"):
                monkeypatch.setenv("RIMS_FAST_CUDA_WIDE", wide)
                got = rs.rim_seq(cu["x"], cu["h0"], cu.get("c0"), Pc, rim.config, xw=xw,
                                 tile=tile, cluster=cluster, mma=False)
                res[wide] = (got, _grads(got[:3], cu))
            (a, ga), (b, gb) = res["0"], res["1"]
            run = (xw, tile, cluster)
            for u, v in zip(a, b):
                assert (u is None) == (v is None) and (u is None or torch.equal(u, v)), run
            for name in leaves:
                assert torch.equal(ga[name], gb[name]), ("d" + name, *run)

    @pytest.mark.parametrize("tile", [1, 3], ids=["wide", "tile3"])
    @pytest.mark.parametrize("xw", [0, 1], ids=["F", "hoisted"])
    def test_phase_clock_counts_and_changes_nothing(self, xw, tile):
        """The phase timing (tools/phase_clocks.py) counts every block-step of both kernels, times
        each phase, and leaves every output and gradient bit-identical (tile 1: the wide
        kernels)."""
        rim, x, h0, c0, P, leaves = _setup(*GRID[0], B=19)
        cu = {n: v.detach().cuda().requires_grad_(True) for n, v in leaves.items()}
        Pc = {n: cu[n] for n in PARAMS}

        def run():
            got = rs.rim_seq(cu["x"], cu["h0"], cu.get("c0"), Pc, rim.config, xw=xw, tile=tile,
                             cluster=0, mma=False)
            return got, _grads(got[:3], cu)

        from rims_fast import _C

        base, g_base = run()
        buf = torch.zeros(128, dtype=torch.int64, device="cuda")
        _C._set_phase_clock(buf)
        try:
            got, g_got = run()
            torch.cuda.synchronize()
        finally:
            _C._set_phase_clock(None)
        for a, b in zip(got, base):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        for name in leaves:
            assert torch.equal(g_got[name], g_base[name]), "d" + name
        T, tiles = x.shape[0], -(-19 // tile)
        for k, n_phases in ((0, 10 - xw), (64, 13 - xw)):  # forward, backward (tools/phase_clocks.py)
            c = buf[k:k + 64].cpu()
            assert int(c[63]) == T * tiles
            assert bool((c[:n_phases] > 0).all()) and not bool(c[n_phases:63].any()), c


def test_wide_env_checked(monkeypatch):
    """RIMS_FAST_CUDA_WIDE is 0 or 1 (the CUDA launcher reads it; rim_seq checks it first)."""
    rim, x, h0, c0, P, _ = _setup("lstm", 1, 1, 1, 4, 2, 2, 8, B=2)
    monkeypatch.setenv("RIMS_FAST_CUDA_WIDE", "2")
    with pytest.raises(ValueError, match="RIMS_FAST_CUDA_WIDE must be 0 or 1"):
        rs.rim_seq(x, h0, c0, P, rim.config)
    monkeypatch.setenv("RIMS_FAST_CUDA_WIDE", "0")
    assert not rs.wide_mode()


@pytest.mark.parametrize("case", [GRID[0], GRID[5]], ids=["lstm", "gru"])
@pytest.mark.parametrize("xw", [0, 1], ids=["F", "hoisted"])
@pytest.mark.parametrize("tile,cluster", [(1, 0), (2, 0), (1, 2)],
                         ids=["tile1", "tile2", "cluster-tile1"])
def test_host_wide_equals_narrow(monkeypatch, case, xw, tile, cluster):
    """At tiles 1 and 2 the host runs follow RIMS_FAST_CUDA_WIDE as the device does: =1 runs the
    tile functions' SMAX = tile instantiation (the 512-thread kernels' code; the backward's and
    the cluster forward's at tile 1 only), =0 the tile-8 one. The same arithmetic in
    the same order, so outputs and gradients are equal bit for bit (the GPU twin is
    TestCUDA.test_wide_equals_narrow); the SMAX = 1, 2 code is also checked against the reference
    by the host tests at those tiles, which run with the default. B = 7: a partial last tile at
    tile 2."""
    res = {}
    for wide in ("0", "1"):
        monkeypatch.setenv("RIMS_FAST_CUDA_WIDE", wide)
        rim, x, h0, c0, P, leaves = _setup(*case, B=7)
        got = rs.rim_seq(x, h0, c0, P, rim.config, xw=xw, tile=tile, cluster=cluster)
        res[wide] = (got, _grads(got[:3], leaves))
    (a, ga), (b, gb) = res["0"], res["1"]
    for u, v in zip(a, b):
        assert (u is None) == (v is None) and (u is None or torch.equal(u, v))
    for name in ga:
        assert torch.equal(ga[name], gb[name]), "d" + name


def test_phase_clock_buffer_checks():
    """_set_phase_clock takes an int64 CUDA buffer of 2 x 64 counters, or None."""
    from rims_fast import _C

    with pytest.raises(RuntimeError, match="int64 CUDA tensor"):
        _C._set_phase_clock(torch.zeros(128, dtype=torch.int64))
    _C._set_phase_clock(None)
