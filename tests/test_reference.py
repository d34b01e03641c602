"""The reference (``rims_fast.rim_ref``) against the plain loop, gradcheck, and SPEC invariants."""

from __future__ import annotations

import pytest
import torch

import rims_fast
from helpers import SMALL_HEADS, assert_close, make_rim, random_state
from plain_rim import plain_rim

PARAMS = ("input_key", "input_value", "input_query", "weight_ih", "weight_hh", "bias_ih",
          "bias_hh", "comm_query", "comm_key", "comm_value", "comm_output")

# (cell, M, input_heads, comm_heads, K, top_k, T, block_inactive_grad): multi-head, M > 1,
# top_k == K and top_k == 1, T == 1, odd H via make_rim's H = 3, both gradient-blocking modes.
GRID = [
    ("lstm", 1, 1, 1, 4, 2, 3, True),
    ("lstm", 3, 2, 2, 4, 2, 4, True),
    ("lstm", 2, 2, 3, 5, 5, 3, False),
    ("lstm", 1, 3, 2, 4, 1, 1, True),
    ("gru", 1, 1, 2, 4, 2, 3, True),
    ("gru", 3, 2, 2, 5, 3, 4, False),
    ("gru", 2, 1, 1, 3, 3, 2, True),
]


def _run_both(cell, M, n_in, n_c, K, top_k, T, block, B=3, D=5, zero_state=False):
    rim = make_rim(cell=cell, num_units=K, top_k=top_k, input_heads=n_in, comm_heads=n_c,
                   block_inactive_grad=block, input_size=D)
    x = torch.randn(T, B, M, D, dtype=torch.float64, requires_grad=True)
    state = random_state(rim, B) if not zero_state else None
    if state is None:
        h0 = torch.zeros(B, K, rim.hidden_size, dtype=torch.float64)
        c0 = torch.zeros_like(h0) if cell == "lstm" else None
    else:
        h0, c0 = state if cell == "lstm" else (state, None)
    h0.requires_grad_(True)
    if c0 is not None:
        c0.requires_grad_(True)
    P = dict(rim.named_parameters())
    ref = rims_fast.rim_ref(x, h0, c0, P, rim.config)
    plain = plain_rim(x, h0, c0, P, rim.config)
    leaves = {"x": x, "h0": h0, **({"c0": c0} if c0 is not None else {}), **P}
    return ref, plain, leaves


def _grads(outputs, leaves, seed=3):
    """Gradients of a fixed random projection of (out, h_n, c_n) w.r.t. every leaf."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
               for o in outputs if o is not None)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (gr if gr is not None else torch.zeros_like(v)) for (n, v), gr in zip(leaves.items(), grads)}


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("zero_state", [False, True], ids=["state", "zero"])
def test_reference_matches_plain_loop(case, zero_state):
    ref, plain, leaves = _run_both(*case, zero_state=zero_state)
    assert torch.equal(ref[3], plain[3]), "masks differ"
    for name, a, b in zip(("out", "h_n", "c_n"), ref[:3], plain[:3]):
        if a is not None:
            assert_close(name, a, b, torch.float64)
    g_ref, g_plain = _grads(ref[:3], leaves), _grads(plain[:3], leaves)
    for name in leaves:
        assert_close("d" + name, g_ref[name], g_plain[name], torch.float64,
                     "grad_w" if name in PARAMS else "grad_in")


def test_reference_uses_given_masks():
    ref, _, leaves = _run_both("lstm", 2, 2, 2, 4, 2, 3, True)
    masks = torch.zeros_like(ref[3])
    masks[..., 1:3] = True  # a selection the competition would not make
    rim_cfg = make_rim(num_units=4, top_k=2, input_heads=2, comm_heads=2).config
    P = {n: leaves[n] for n in PARAMS}
    got = rims_fast.rim_ref(leaves["x"], leaves["h0"], leaves["c0"], P, rim_cfg, masks=masks)
    want = plain_rim(leaves["x"], leaves["h0"], leaves["c0"], P, rim_cfg, masks=masks)
    assert torch.equal(got[3], masks)
    assert_close("out", got[0], want[0], torch.float64)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_float64(cell):
    # block_inactive_grad=False: only then is the gradient the true derivative that finite
    # differences see (True is a deliberate stop-gradient, pinned by the test below).
    # Random state: no ties in the competition, so finite differences do not flip the masks.
    rim = make_rim(cell=cell, block_inactive_grad=False, num_units=3, top_k=2, input_size=3,
                   input_heads=2, comm_heads=2, input_value_size=2, input_key_size=2,
                   comm_key_size=2, comm_value_size=2, hidden_size=2)
    B, T, M = 2, 2, 2
    state = random_state(rim, B)
    h0, c0 = state if cell == "lstm" else (state, None)
    x = torch.randn(T, B, M, 3, dtype=torch.float64)
    names = list(dict(rim.named_parameters()))
    leaves = [x, h0] + ([c0] if c0 is not None else []) + [p.detach().clone() for p in rim.parameters()]
    for t in leaves:
        t.requires_grad_(True)

    def f(*args):
        x, h0, *rest = args
        c0 = rest.pop(0) if cell == "lstm" else None
        out, h_n, c_n, _ = rims_fast.rim_ref(x, h0, c0, dict(zip(names, rest)), rim.config)
        return (out, h_n) + ((c_n,) if c_n is not None else ())

    masks = rims_fast.rim_ref(x, h0, c0, dict(zip(names, leaves[-len(names):])), rim.config)[3]
    assert masks.any(-1).all() and not masks.all()  # both kinds of mechanism are exercised
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


def _one_step_dh0(block):
    rim = make_rim(block_inactive_grad=block)
    h0, c0 = random_state(rim, 3)
    h0.requires_grad_(True)
    x = torch.randn(1, 3, 1, 5, dtype=torch.float64)
    out, h_n, c_n, masks = rims_fast.rim_ref(x, h0, c0, dict(rim.named_parameters()), rim.config)
    g_out = torch.randn_like(out)
    (out * g_out).sum().backward()
    return h0.grad, g_out.view(3, rim.num_units, rim.hidden_size), masks[0], rim


def test_block_inactive_grad_stops_only_the_kv_path():
    dh_block, g_out, mask, rim = _one_step_dh0(True)
    dh_free, _, mask2, _ = _one_step_dh0(False)
    assert torch.equal(mask, mask2)
    inactive = ~mask
    # Blocked: an inactive mechanism's h_0 receives exactly the gradient of its copy, nothing else.
    assert torch.equal(dh_block[inactive], g_out[inactive])
    # Unblocked: the communication keys/values add gradient into inactive h_0.
    assert (dh_free[inactive] - g_out[inactive]).abs().max() > 1e-6
    # Active mechanisms' gradients are unaffected by the flag.
    torch.testing.assert_close(dh_block[mask], dh_free[mask], atol=1e-12, rtol=0)
    # comm_key / comm_value of an inactive mechanism still get gradient when blocked.
    assert rim.comm_key.grad is not None and rim.comm_key.grad.abs().sum() > 0


def test_inactive_gets_no_parameter_gradient_from_its_step():
    rim = make_rim(num_units=4, top_k=1)
    x = torch.randn(1, 3, 1, 5, dtype=torch.float64)
    masks = torch.zeros(1, 3, 4, dtype=torch.bool)
    masks[..., 0] = True  # only mechanism 0 active for every sample
    h0, c0 = random_state(rim, 3)
    out, *_ = rims_fast.rim_ref(x, h0, c0, dict(rim.named_parameters()), rim.config, masks=masks)
    out.sum().backward()
    for name in ("input_query", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "comm_query",
                 "comm_output"):
        g = getattr(rim, name).grad
        assert g[1:].abs().max() == 0, name
        assert g[0].abs().max() > 0, name


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_invariants(cell):
    rim = make_rim(cell=cell, num_units=5, top_k=3)
    x = torch.randn(6, 4, 2, 5, dtype=torch.float64)
    out, state, masks = rim(x, random_state(rim, 4), return_masks=True)
    assert masks.dtype == torch.bool and masks.shape == (6, 4, 5)
    assert (masks.sum(-1) == 3).all(), "exactly top_k active per row"
    h = out.view(6, 4, 5, 3)
    prev = torch.cat([random_state(rim, 4)[0].unsqueeze(0) if cell == "lstm"
                      else random_state(rim, 4).unsqueeze(0), h[:-1]])
    inactive = ~masks
    assert torch.equal(h[inactive], prev[inactive]), "inactive h must be copied bit-exactly"


def test_inactive_c_copied_bit_exactly():
    rim = make_rim(num_units=5, top_k=2)
    h0, c0 = random_state(rim, 4)
    x = torch.randn(1, 4, 1, 5, dtype=torch.float64)
    _, (h1, c1), masks = rim(x, (h0, c0), return_masks=True)
    assert torch.equal(c1[~masks[0]], c0[~masks[0]])
    assert not torch.equal(c1[masks[0]], c0[masks[0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_go_to_lower_index(dtype):
    # Zero state: q = 0, every p_k = 1/(M+1) exactly, all tie; the lowest indices win.
    rim = make_rim(num_units=6, top_k=4, dtype=dtype)
    _, _, masks = rim(torch.randn(1, 5, 3, 5, dtype=dtype), return_masks=True)
    assert torch.equal(masks[0], torch.tensor([[True] * 4 + [False] * 2] * 5))


def test_select_active_rank_rule():
    lower = torch.ones(4, 4, dtype=torch.bool).tril(-1)
    p = torch.tensor([[0.3], [0.1], [0.3], [0.1]])  # (K, B)
    assert rims_fast.reference.select_active(p, 2, lower)[:, 0].tolist() == [False, True, False, True]
    assert rims_fast.reference.select_active(p, 3, lower)[:, 0].tolist() == [True, True, False, True]
    p = torch.tensor([[1.0], [0.0], [0.0], [1.0]])  # saturated values tie too
    assert rims_fast.reference.select_active(p, 1, lower)[:, 0].tolist() == [False, True, False, False]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_carried_across_calls_equals_one_call(cell, dtype):
    rim = make_rim(cell=cell, dtype=dtype)
    x = torch.randn(7, 3, 2, 5, dtype=dtype)
    out, state, masks = rim(x, return_masks=True)
    out1, s1, m1 = rim(x[:3], return_masks=True)
    out2, s2, m2 = rim(x[3:], s1, return_masks=True)
    assert torch.equal(torch.cat([m1, m2]), masks)
    assert torch.equal(torch.cat([out1, out2]), out)
    for a, b in zip(state if cell == "lstm" else [state], s2 if cell == "lstm" else [s2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rimcell_steps_equal_rim(cell):
    rim = make_rim(cell=cell)
    rcell = rims_fast.RIMCell(5, 3, 4, 2, cell=cell, dtype=torch.float64, **SMALL_HEADS)
    rcell.load_state_dict(rim.state_dict())
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    out, state, masks = rim(x, return_masks=True)
    s = None
    for t in range(4):
        s, m = rcell(x[t], s)
        assert torch.equal(m, masks[t])
        h = s[0] if cell == "lstm" else s
        assert torch.equal(h.flatten(1), out[t])


def test_batch_first_equivalent():
    rim = make_rim()
    rim_bf = make_rim(batch_first=True)
    rim_bf.load_state_dict(rim.state_dict())
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    out, (h, c), masks = rim(x, return_masks=True)
    out_bf, (h_bf, c_bf), masks_bf = rim_bf(x.transpose(0, 1), return_masks=True)
    assert torch.equal(out_bf, out.transpose(0, 1)) and torch.equal(masks_bf, masks.transpose(0, 1))
    assert torch.equal(h_bf, h) and torch.equal(c_bf, c)


def test_m1_rank3_equals_rank4():
    rim = make_rim()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    assert torch.equal(rim(x)[0], rim(x.unsqueeze(2))[0])


def test_non_contiguous_input():
    rim = make_rim()
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64).transpose(0, 1)  # (4, 3, 2, 5), strided
    assert not x.is_contiguous()
    assert torch.equal(rim(x)[0], rim(x.contiguous())[0])


def test_dropout_train_only_and_reproducible():
    rim = make_rim(input_dropout=0.5, comm_dropout=0.5)
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    rim.eval()
    assert torch.equal(rim(x)[0], rim(x)[0])
    rim.train()
    torch.manual_seed(7)
    a = rim(x)
    torch.manual_seed(7)
    b = rim(x)
    assert torch.equal(a[0], b[0])
    c = rim(x)
    assert not torch.equal(a[0], c[0])
    rim.eval()
    no_drop = rim(x, return_masks=True)
    rim.train()
    torch.manual_seed(7)
    # Selection uses the undropped attention: at step 0 both runs share the state, so the masks agree.
    assert torch.equal(rim(x, return_masks=True)[2][0], no_drop[2][0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reference(dtype):
    rim64 = make_rim()
    rim = make_rim(dtype=dtype)
    rim.load_state_dict({k: v.to(dtype) for k, v in rim64.state_dict().items()})
    rim64.load_state_dict({k: v.to(dtype).double() for k, v in rim64.state_dict().items()})
    x = torch.randn(5, 3, 2, 5).to(dtype)
    out, (h, c), masks = rim(x, return_masks=True)
    out64, (h64, c64), masks64 = rim64(x.double(), return_masks=True)
    assert out.dtype == dtype and h.dtype == dtype and c.dtype == dtype
    if torch.equal(masks, masks64):
        assert_close("out", out, out64, dtype)
        assert_close("c_n", c, c64, dtype)


def test_given_dropout_masks_replay_a_draw():
    # rim_ref draws, per step, the input keep-mask (K, B, n_in, M) then the communication one
    # (K, B, n_c, K) from torch's generator. Re-draw the same sequence by hand, hand it over in
    # the public (T, B, K, n, .) layout, and the output must be bit-identical.
    rim = make_rim(input_dropout=0.4, comm_dropout=0.3, num_units=4, top_k=2)
    T, B, M, K, n_in, n_c = 3, 2, 2, 4, 2, 2
    x = torch.randn(T, B, M, 5, dtype=torch.float64)
    h0, c0 = random_state(rim, B)
    P = dict(rim.named_parameters())
    torch.manual_seed(11)
    drawn = rims_fast.rim_ref(x, h0, c0, P, rim.config, training=True)[0]
    torch.manual_seed(11)
    keep_in, keep_c = [], []
    for _ in range(T):
        keep_in.append(torch.empty(K, B, n_in, M, dtype=torch.float64).bernoulli_(0.6).bool())
        keep_c.append(torch.empty(K, B, n_c, K, dtype=torch.float64).bernoulli_(0.7).bool())
    given = (torch.stack(keep_in).transpose(1, 2), torch.stack(keep_c).transpose(1, 2))
    replay = rims_fast.rim_ref(x, h0, c0, P, rim.config, training=True, dropout_masks=given)[0]
    assert torch.equal(replay, drawn)
    assert not torch.equal(replay, rims_fast.rim_ref(x, h0, c0, P, rim.config)[0])


def _ref_args(cell="lstm"):
    """A valid ``rim_ref`` call for a (T=3, B=2, M=1) input, as a dict to break one entry of."""
    rim = make_rim(cell=cell)
    h0, c0 = random_state(rim, 2) if cell == "lstm" else (random_state(rim, 2), None)
    return dict(x=torch.randn(3, 2, 1, 5, dtype=torch.float64), h0=h0, c0=c0,
                params=dict(rim.named_parameters()), cfg=rim.config)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(x=torch.randn(3, 2, 5, dtype=torch.float64)), ValueError, "x must have dim 4, got dim 3"),
    (dict(x=torch.randn(3, 2, 1, 4, dtype=torch.float64)), ValueError, "shape.*input_size=5"),
    (dict(x=torch.randn(3, 2, 1, 5)), TypeError, "x has dtype torch.float32"),
    (dict(x=torch.zeros(3, 2, 1, 5, dtype=torch.long)), TypeError, "floating"),
    (dict(h0=None), TypeError, "h0 and c0 must be given"),
    (dict(c0=None), TypeError, "h0 and c0 must be given"),
    (dict(h0=torch.zeros(2, 4, 2, dtype=torch.float64)), ValueError, r"h_0 has shape \(2, 4, 2\)"),
    (dict(masks=torch.ones(3, 2, dtype=torch.bool)), ValueError,
     r"masks has shape \(3, 2\), expected shape \(T, B, K\) = \(3, 2, 4\)"),
    (dict(masks=torch.ones(2, 3, 4, dtype=torch.bool)), ValueError, "masks has shape"),  # (B, T, K)
    (dict(masks=torch.ones(3, 2, 4)), TypeError, "masks must be a bool Tensor"),
])
def test_rim_ref_checks_its_arguments(bad, exc, match):
    args = {**_ref_args(), **bad}
    with pytest.raises(exc, match=match):
        rims_fast.rim_ref(args.pop("x"), args.pop("h0"), args.pop("c0"), args.pop("params"),
                          args.pop("cfg"), **args)


def test_rim_ref_gru_needs_only_h0():
    args = _ref_args("gru")
    out = rims_fast.rim_ref(args["x"], args["h0"], None, args["params"], args["cfg"])[0]
    assert out.shape == (3, 2, 12)
    with pytest.raises(TypeError, match="h0 must be given"):
        rims_fast.rim_ref(args["x"], None, None, args["params"], args["cfg"])


def test_rim_ref_does_not_check_the_mask_count():
    """Documented: counting true per row would cost a device sync, so any bool mask runs."""
    args = _ref_args()
    masks = torch.ones(3, 2, 4, dtype=torch.bool)  # 4 active, top_k = 2
    got = rims_fast.rim_ref(args["x"], args["h0"], args["c0"], args["params"], args["cfg"],
                            masks=masks)
    assert torch.equal(got[3], masks)


def test_brim_ref_checks_its_arguments():
    brim = rims_fast.BRIM(5, [3, 4], [4, 3], [2, 1], dtype=torch.float64, **SMALL_HEADS)
    x = torch.randn(3, 2, 1, 5, dtype=torch.float64)
    states = [(torch.zeros(2, c.num_units, c.hidden_size, dtype=torch.float64),) * 2
              for c in brim.configs]
    P = [dict(layer.named_parameters()) for layer in brim.layers]
    assert len(rims_fast.brim_ref(x, states, P, brim.configs)[0]) == 2
    with pytest.raises(ValueError, match="x must have dim 4"):
        rims_fast.brim_ref(x[:, :, 0], states, P, brim.configs)
    with pytest.raises(TypeError, match="states must be a list of 2"):
        rims_fast.brim_ref(x, states[:1], P, brim.configs)
    with pytest.raises(TypeError, match=r"states\[1\]\.h0 and states\[1\]\.c0 must be given"):
        rims_fast.brim_ref(x, [states[0], (None, None)], P, brim.configs)
    with pytest.raises(ValueError, match=r"states\[1\]\.c_0 has shape"):
        rims_fast.brim_ref(x, [states[0], (states[1][0], states[0][1])], P, brim.configs)
    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(3, 2, 4\), expected shape "
                                         r"\(T, B, K\) = \(3, 2, 3\)"):
        rims_fast.brim_ref(x, states, P, brim.configs,
                           masks=[torch.ones(3, 2, 4, dtype=torch.bool)] * 2)
