"""BRIM stacks one fused layer-step per call (rims_fast.brim_steps) against ``brim_ref``: on the
C++ driver (``brim_cpu``, ``BRIM(backend="cpu")``), on the persistent CUDA kernels and on the
stepped ops (``brim_seq``, here their host runs on CPU tensors). Float64, float32 and (C++ driver) half
precision against the float64 reference under the implementation's masks, every gradient, dropout
replayed from the implementation's own keep-masks, batch tiles on 2 threads.
(Float64 equality of ``backend="cpu"`` with a plain loop, L = 1, 2, 3, is in test_brim.py.)"""

from __future__ import annotations

import functools

import pytest
import torch

import rims_fast
from brim_compare import assert_brim_close, clone_states, pairs
from rims_fast import brim_cpu, brim_seq, brim_steps, rim_seq
from test_brim import brim_states, make_brim

pytestmark = pytest.mark.skipif(
    brim_cpu.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"C++ driver not built: {brim_cpu.unavailable_reason(torch.device('cpu'), torch.float32)}")

_NO_SEQ = brim_seq.unavailable_reason(torch.device("cpu"), torch.float64)
#: The implementations: the C++ driver, and the persistent kernels' host runs.
IMPLS = [pytest.param(brim_cpu.brim_cpu, id="cpu"),
         pytest.param(brim_seq.brim_seq, id="seq", marks=pytest.mark.skipif(
             _NO_SEQ is not None, reason=f"rim_seq ops not built: {_NO_SEQ}")),
         pytest.param(functools.partial(brim_seq.brim_seq, stepped=True), id="steps",
                      marks=pytest.mark.skipif(_NO_SEQ is not None,
                                               reason=f"rim_seq ops not built: {_NO_SEQ}"))]


def _run(brim, x, states, **kw):
    """The module's parameters per layer, states as (h, c) pairs."""
    return [dict(layer.named_parameters()) for layer in brim.layers], pairs(states)


def _compare(brim, x, states, dtype, training=False, impl=brim_cpu.brim_cpu, **kw):
    """Run brim_cpu in ``dtype`` and brim_ref in float64 (under brim_cpu's masks and, with
    dropout, its keep-masks); compare outputs, final states and every gradient."""
    brim64 = brim
    x64 = x.detach().requires_grad_(True)
    s64 = clone_states(states, torch.float64, "cpu")
    brim_d = make_brim(dtype=dtype, **kw)
    brim_d.load_state_dict({k: v.to(dtype) for k, v in brim64.state_dict().items()})
    xd = x.detach().to(dtype).requires_grad_(True)
    sd = clone_states(states, dtype, "cpu")
    P, st = _run(brim_d, xd, sd)
    seed = 4321
    got = impl(xd, st, P, brim_d.configs, training=training, seed=seed)
    keep = None
    if training:
        T, B, M = x.shape[0], x.shape[1], x.shape[2]
        keep = brim_steps.dropout_masks(seed, T, B, M, brim_d.configs)
        assert 0.4 < keep[0][0].float().mean() < 0.9
    P64, pairs64 = _run(brim64, x64, s64)
    want = rims_fast.brim_ref(x64, pairs64, P64, brim64.configs, masks=got[2],
                              training=training, dropout_masks=keep)
    assert_brim_close(got, want, brim_d, xd, sd, brim64, x64, s64, dtype)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_matches_float64_reference(cell, dtype):
    brim = make_brim(cell=cell)
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    _compare(brim, x, brim_states(brim, 3), dtype, cell=cell)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stack_sizes(cell, L, dtype, impl):
    kw = dict(cell=cell, hidden_sizes=[3, 4, 2][:L], num_units=[4, 3, 3][:L], top_k=[2, 1, 3][:L],
              block_inactive_grad=L != 2)
    brim = make_brim(**kw)
    x = torch.randn(3, 3, 2, 5, dtype=torch.float64)
    _compare(brim, x, brim_states(brim, 3), dtype, impl=impl, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_replays_in_reference(cell, impl):
    kw = dict(cell=cell, input_dropout=0.3, comm_dropout=0.4)
    brim = make_brim(**kw)
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    got = _compare(brim, x, brim_states(brim, 3), torch.float64, training=True, impl=impl, **kw)
    P, st = _run(brim, x, brim_states(brim, 3))
    plain = impl(x, st, P, brim.configs, training=False)
    assert (plain[0][-1] - got[0][-1]).abs().max() > 1e-3, "dropout had no effect"


@pytest.mark.skipif(_NO_SEQ is not None, reason=f"rim_seq ops not built: {_NO_SEQ}")
@pytest.mark.parametrize("training", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_seq_tensor_cores(cell, training, monkeypatch):
    """The persistent kernels' tensor-core path (RIMS_FAST_CUDA_MMA's tiling, forced on in the
    host runs) per layer-step — per-head values, T = 1 calls, L = 3 — against the float64
    reference: outputs, states, every gradient, dropout replayed."""
    calls = []

    def forced(device, dtype):
        calls.append(dtype)
        return True

    monkeypatch.setattr(brim_seq, "mma_mode", forced)
    kw = dict(cell=cell, input_dropout=0.3 if training else 0.0,
              comm_dropout=0.4 if training else 0.0)
    brim = make_brim(**kw)
    x = torch.randn(3, 3, 2, 5, dtype=torch.float64)
    _compare(brim, x, brim_states(brim, 3), torch.float64, training=training,
             impl=brim_seq.brim_seq, **kw)
    assert len(calls) == 3 * 3  # every layer-step took the tensor-core path


def test_dropout_reproducible_under_manual_seed():
    brim = make_brim(input_dropout=0.5, comm_dropout=0.5, backend="cpu").train()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(brim(x)[0])
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(8)
    assert not torch.equal(outs[0], brim(x)[0])


def test_batch_tiles_on_two_threads():
    """B = 37 (several batch tiles per layer-step) at 2 threads: equal to 1 thread to round-off,
    and to the float64 reference."""
    old = torch.get_num_threads()
    try:
        brim = make_brim(hidden_sizes=[5, 6, 3], num_units=[5, 4, 3], top_k=[3, 2, 1])
        x = torch.randn(3, 37, 2, 5, dtype=torch.float64)
        res = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            P, st = _run(brim, x, brim_states(brim, 37))
            res.append(brim_cpu.brim_cpu(x, st, P, brim.configs))
        for a, b in zip(res[0][0], res[1][0]):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
        _compare(brim, x, brim_states(brim, 37), torch.float64,
                 hidden_sizes=[5, 6, 3], num_units=[5, 4, 3], top_k=[3, 2, 1])
    finally:
        torch.set_num_threads(old)


def test_no_grad_saves_nothing():
    """Under no_grad each layer-step runs with save=False (no activations kept)."""
    brim = make_brim(backend="cpu")
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.no_grad():
        out, _ = brim(x)
    assert sizes == [] and out.shape == (6, 2, 6)


@pytest.mark.skipif(_NO_SEQ is not None, reason=f"rim_seq ops not built: {_NO_SEQ}")
def test_auto_layer_reruns_on_stepped_when_shared_memory_is_short(monkeypatch):
    """RIMS_FAST_CUDA_FWD=auto in a stack: a layer-step whose persistent launch reports the
    shared-memory limit (faked: host runs have none) reruns on the stepped ops, equal to asking
    for them; test_rim_seq has the single layer's twin."""
    monkeypatch.delenv("RIMS_FAST_CUDA_FWD", raising=False)
    brim = make_brim()
    x = torch.randn(4, 2, 1, 5, dtype=torch.float64)
    params, states = _run(brim, x, brim_states(brim, 2))
    real = brim_seq.rim_seq_op
    calls = []

    def fake(*args):
        calls.append(args[-1])
        if not args[-1]:
            raise RuntimeError(f"one sample needs 300000 {rim_seq.SMEM_ERROR}")
        return real(*args)

    monkeypatch.setattr(brim_seq, "rim_seq_op", fake)
    got = brim_seq.brim_seq(x, states, params, brim.configs)
    assert calls and all(calls[i:i + 2] == [False, True] for i in range(0, len(calls), 2))
    want = brim_seq.brim_seq(x, states, params, brim.configs, stepped=True)
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)
