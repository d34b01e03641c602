"""BRIM (SPEC "Multi-layer: BRIM"): L = 1 equals RIM; L = 2, 3 against a plain layer-by-layer loop."""

from __future__ import annotations

import pytest
import torch

import rims_fast
from helpers import SMALL_HEADS, assert_close, make_rim, random_state
from plain_rim import plain_brim
from rims_fast import brim_cpu

_NO_CPU = brim_cpu.unavailable_reason(torch.device("cpu"), torch.float64)
#: The backends these tests run on CPU tensors: the reference and the C++ driver.
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    _NO_CPU is not None, reason=f"C++ driver not built: {_NO_CPU}"))]

SMALL = dict(input_heads=2, input_key_size=3, input_value_size=2, comm_heads=2, comm_key_size=2,
             comm_value_size=2)


def make_brim(seed=0, **kw):
    args = dict(input_size=5, hidden_sizes=[3, 4, 2], num_units=[4, 3, 3], top_k=[2, 1, 3],
                dtype=torch.float64, backend="torch", **SMALL)
    args.update(kw)
    torch.manual_seed(seed)
    return rims_fast.BRIM(args.pop("input_size"), args.pop("hidden_sizes"), args.pop("num_units"),
                          args.pop("top_k"), **args)


def brim_states(brim, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for cfg in brim.configs:
        shape = (B, cfg.num_units, cfg.hidden_size)
        h = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        c = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        out.append((h, c) if cfg.cell == "lstm" else h)
    return out


def test_parameter_names():
    names = dict(make_brim().named_parameters())
    for l in range(3):
        assert f"layers.{l}.input_key_bottom_up" in names and f"layers.{l}.weight_hh" in names
        assert f"layers.{l}.input_key" not in names
    assert names["layers.0.input_key_bottom_up"].shape == (5, 6)
    assert names["layers.1.input_value_bottom_up"].shape == (4 * 3, 4)  # below: K*H = 12
    assert names["layers.0.input_key_top_down"].shape == (3 * 4, 6)  # above: K*H = 12
    assert names["layers.1.input_key_top_down"].shape == (3 * 2, 6)
    assert "layers.2.input_key_top_down" not in names  # the top layer has nothing above


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_one_layer_equals_rim(cell, backend):
    rim = make_rim(cell=cell, backend="torch")
    brim = rims_fast.BRIM(5, 3, 4, 2, cell=cell, dtype=torch.float64, backend=backend,
                          **SMALL_HEADS)
    sd = {("layers.0." + k.replace("input_key", "input_key_bottom_up")
           .replace("input_value", "input_value_bottom_up")): v for k, v in rim.state_dict().items()}
    brim.load_state_dict(sd)
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    state = random_state(rim, 3)
    out_r, s_r, m_r = rim(x, state, return_masks=True)
    out_b, s_b, m_b = brim(x, [state], return_masks=True)
    assert torch.equal(m_r, m_b[0])
    assert_close("out", out_b, out_r, torch.float64)
    g_r = torch.autograd.grad(out_r.square().sum(), [x, rim.weight_hh, rim.input_key])
    g_b = torch.autograd.grad(out_b.square().sum(), [x, brim.layers[0].weight_hh,
                                                      brim.layers[0].input_key_bottom_up])
    for name, a, b in zip(("dx", "dweight_hh", "dinput_key"), g_b, g_r):
        assert_close(name, a, b, torch.float64, "grad_w")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("L", [2, 3])
def test_stack_matches_plain_loop(cell, L, backend):
    brim = make_brim(cell=cell, hidden_sizes=[3, 4, 2][:L], num_units=[4, 3, 3][:L],
                     top_k=[2, 1, 3][:L], block_inactive_grad=False, backend=backend)
    B, T = 3, 4
    x = torch.randn(T, B, 2, 5, dtype=torch.float64, requires_grad=True)
    states = brim_states(brim, B)
    out, final, masks = brim(x, states, return_masks=True)
    assert brim.last_backend == backend
    P = [dict(layer.named_parameters()) for layer in brim.layers]
    as_pairs = [s if cell == "lstm" else (s, None) for s in states]
    p_outs, p_final, p_masks = plain_brim(x, as_pairs, P, brim.configs)
    for l in range(L):
        assert torch.equal(masks[l], p_masks[l]), f"layer {l} masks"
    assert_close("out", out, p_outs[-1], torch.float64)
    for l in range(L):
        got = final[l] if cell == "lstm" else (final[l],)
        for name, a, b in zip(("h_n", "c_n"), got, p_final[l]):
            assert_close(f"{name}[{l}]", a, b, torch.float64)
    # Every gradient: x, all states, all parameters of all layers.
    leaves = [x] + [t for s in states for t in (s if cell == "lstm" else (s,))]
    leaves += list(brim.parameters())
    names = ["x"] + [f"state{i}" for i in range(len(leaves) - 1 - len(P) * len(P[0]))]
    names += [n for n, _ in brim.named_parameters()]
    g = torch.Generator().manual_seed(5)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((out * w_out).sum(), leaves, allow_unused=True)
    g_want = torch.autograd.grad((p_outs[-1] * w_out).sum(), leaves, allow_unused=True)
    for name, a, b in zip(names, g_got, g_want):
        a = torch.zeros(1) if a is None else a
        b = torch.zeros(1) if b is None else b
        assert_close("d" + name, a, b, torch.float64, "grad_w")


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_down_reaches_every_layer(backend):
    # The public code feeds the top layer back to layer 0 only; here layer l hears layer l+1.
    brim = make_brim(backend=backend)
    x = torch.randn(3, 2, 1, 5, dtype=torch.float64)
    states = brim_states(brim, 2)
    for l in range(2):
        td = brim.layers[l].input_value_top_down
        td.grad = None
        _, f2, _ = brim(x, states, return_masks=True)
        f2[l][0].sum().backward()
        assert td.grad is not None and td.grad.abs().sum() > 0, f"layer {l} ignores the layer above"


def test_output_all_layers_and_batch_first():
    brim = make_brim(output_all_layers=True, batch_first=True)
    x = torch.randn(2, 4, 5, dtype=torch.float64)  # (B, T, D)
    out, states, masks = brim(x, return_masks=True)
    assert out.shape == (2, 4, 12 + 12 + 6)
    assert [m.shape for m in masks] == [(2, 4, 4), (2, 4, 3), (2, 4, 3)]
    assert [s[0].shape for s in states] == [(2, 4, 3), (2, 3, 4), (2, 3, 2)]
    top = make_brim(batch_first=True)
    assert torch.equal(top(x)[0], out[..., 24:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_carried_across_calls(backend):
    brim = make_brim(backend=backend)
    x = torch.randn(5, 2, 5, dtype=torch.float64)
    out, s = brim(x)
    o1, s1 = brim(x[:2])
    o2, s2 = brim(x[2:], s1)
    assert torch.equal(torch.cat([o1, o2]), out)
    for (a, b), (c, d) in zip(s, s2):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(hidden_sizes=[3, 4], num_units=[4, 3, 3]), ValueError, "entries"),
    (dict(hidden_sizes=[3, 4], num_layers=3), ValueError, "^hidden_sizes has 2 entries"),
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(top_k=[2, 5, 1]), ValueError, r"^layer 1: top_k must be an int in 1\.\.num_units=3"),
    (dict(hidden_sizes=[3, 0, 2]), ValueError, "^layer 1: hidden_sizes must be a positive int"),
    (dict(input_heads=[2, 2, 3], input_value_size=None), ValueError,
     "^layer 2: input_value_size=None"),
    (dict(cell=["lstm", "gru", "lstm"]), ValueError,
     r"^cell must be one of \['gru', 'lstm'\].*one cell for all layers"),
    (dict(input_dropout=1.5), ValueError, "^input_dropout"),  # shared: no layer to name
    (dict(hidden_sizes=[], num_units=[], top_k=[]), ValueError, "at least one layer"),
])
def test_construction_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        make_brim(**kw)


def test_call_errors():
    brim = make_brim()
    x = torch.randn(2, 2, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="3 per-layer"):
        brim(x, [None])
    with pytest.raises(TypeError, match=r"^states\[0\] must be a tuple \(h_0, c_0\)"):
        brim(x, [torch.zeros(2, 4, 3, dtype=torch.float64)] * 3)  # a RIM-style h per layer
    with pytest.raises(ValueError, match=r"states\[1\].h_0 has shape"):
        st = brim_states(brim, 2)
        st[1] = (torch.zeros(2, 3, 5, dtype=torch.float64), st[1][1])
        brim(x, st)
    if not torch.cuda.is_available():  # an explicit backend that cannot run here says why
        with pytest.raises(RuntimeError, match="CUDA"):
            make_brim(backend="cuda")(x)
    brim(x)
    assert brim.last_backend == "torch"
    auto = make_brim(backend="auto")
    auto(x)
    assert auto.last_backend == ("cpu" if _NO_CPU is None else "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["cell", "persistent", "stepped"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_backend_matches_reference(cell, mode, monkeypatch):
    """backend="cuda" (RIMS_FAST_CUDA_FWD: the reference with the fused CUDA cell, or the
    persistent kernels or the stepped ops per layer-step) against backend="torch" on the same CUDA tensors, float64:
    outputs, masks and every gradient."""
    monkeypatch.setenv("RIMS_FAST_CUDA_FWD", mode)
    from rims_fast._backend import unavailable_reason
    why = unavailable_reason("cuda", torch.device("cuda"), torch.float64)
    if why is not None:
        pytest.skip(why)
    res = {}
    for backend in ("cuda", "torch"):
        brim = make_brim(cell=cell, backend=backend).cuda()
        x = torch.randn(4, 3, 2, 5, dtype=torch.float64, device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0)).requires_grad_(True)
        out, _, masks = brim(x, return_masks=True)
        assert brim.last_backend == backend
        grads = torch.autograd.grad(out.square().sum(), [x, *brim.parameters()])
        res[backend] = (out, masks, grads)
    (o1, m1, g1), (o2, m2, g2) = res["cuda"], res["torch"]
    assert all(torch.equal(a, b) for a, b in zip(m1, m2))
    assert_close("out", o1, o2, torch.float64)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert_close(f"grad{i}", a, b, torch.float64, "grad_w")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_persistent_tensor_cores_bf16(cell, monkeypatch):
    """RIMS_FAST_CUDA_FWD=persistent with RIMS_FAST_CUDA_MMA=1: the persistent kernels' weight
    products on tensor cores, one launch per layer-step, bfloat16, against brim_ref in float64
    under the kernels' masks: every layer's output (TOL[bfloat16]); the backward runs."""
    monkeypatch.setenv("RIMS_FAST_CUDA_FWD", "persistent")
    monkeypatch.setenv("RIMS_FAST_CUDA_MMA", "1")
    from rims_fast._backend import unavailable_reason
    why = unavailable_reason("cuda", torch.device("cuda"), torch.bfloat16)
    if why is not None:
        pytest.skip(why)
    brim = make_brim(cell=cell, backend="cuda", dtype=torch.bfloat16).cuda()
    x = torch.randn(4, 3, 2, 5, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    xb = x.bfloat16().requires_grad_(True)
    out, _, masks = brim(xb, return_masks=True)
    assert brim.last_backend == "cuda"
    P64 = [{n: p.detach().double() for n, p in layer.named_parameters()} for layer in brim.layers]
    states = [(torch.zeros(3, c.num_units, c.hidden_size, dtype=torch.float64, device="cuda"),
               torch.zeros(3, c.num_units, c.hidden_size, dtype=torch.float64, device="cuda")
               if c.cell == "lstm" else None) for c in brim.configs]
    outs, _, _ = rims_fast.brim_ref(x.bfloat16().double(), states, P64, brim.configs,
                                    masks=masks)
    assert_close("out", out, outs[-1], torch.bfloat16)
    out.float().square().sum().backward()
    assert torch.isfinite(xb.grad).all()


def test_auto_logs_its_choice(caplog):
    """As RIM's: once per device/dtype, on the rims_fast logger (README "Support matrix")."""
    from rims_fast import _backend
    _backend._resolve_auto.cache_clear()
    brim = make_brim(backend="auto")
    with caplog.at_level("INFO", logger="rims_fast"):
        brim(torch.randn(2, 2, 5, dtype=torch.float64))
        brim(torch.randn(2, 2, 5, dtype=torch.float64))
    logged = [r.getMessage() for r in caplog.records if r.name == "rims_fast"]
    assert logged == [f"rims_fast: BRIM backend='auto' runs {brim.last_backend!r} on "
                      f"cpu/torch.float64"], logged


def test_docstring_auto_order_matches():
    from rims_fast.brim import BRIM_AUTO_ORDER
    doc = " ".join(rims_fast.BRIM.__doc__.split())
    for device, order in BRIM_AUTO_ORDER.items():
        names = ", ".join(f'``"{n}"``' for n in order)
        assert f"{names} on {device.upper()} tensors" in doc, (device, doc)


def test_repr_shows_arguments_then_layers():
    """BRIM's line is its constructor call, non-defaults only (a per-layer argument as one value
    when all layers agree); each layer's line names its sizes."""
    assert repr(rims_fast.BRIM(64, 100, 6, 4)) == (
        "BRIM(\n"
        "  64, 100, num_units=6, top_k=4\n"
        "  (layers): ModuleList(\n"
        "    (0): BrimLayer(64, 100, num_units=6, top_k=4)\n"
        "  )\n"
        ")")
    brim = rims_fast.BRIM(64, [100, 50], [6, 4], [4, 2], input_value_size=[None, 8], comm_heads=2,
                          cell="gru", batch_first=True, output_all_layers=True, backend="cpu")
    assert repr(brim) == (
        "BRIM(\n"
        "  64, [100, 50], num_units=[6, 4], top_k=[4, 2], cell='gru', input_value_size=[None, 8], "
        "comm_heads=2, batch_first=True, output_all_layers=True, backend='cpu'\n"
        "  (layers): ModuleList(\n"
        "    (0): BrimLayer(64, 100, num_units=6, top_k=4, comm_heads=2, top_down_size=200)\n"
        "    (1): BrimLayer(600, 50, num_units=4, top_k=2, input_value_size=8, comm_heads=2)\n"
        "  )\n"
        ")")
    # Lists that agree print as one value; num_layers is then needed to say how many.
    assert (brim_line(rims_fast.BRIM(64, [100, 100], 6, 4))
            == "64, 100, num_units=6, top_k=4, num_layers=2")
    for b in (brim, make_brim()):
        assert eval(f"BRIM({brim_line(b)})", vars(rims_fast)).configs == b.configs


def brim_line(brim):
    return repr(brim).splitlines()[1].strip()
