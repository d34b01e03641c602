"""torch.compile(fullgraph=True) sees a whole sequence as one op node for the fused backends
(STYLE: custom ops with fake impls), and the compiled module computes the same thing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rims_fast
from rims_fast import _backend, rim_cpu, rim_seq


def _sequence_ops(rim, x):
    """The compiled call's output and the forward rims_fast ops in its graph, including those in
    subgraphs (an autograd.Function, such as rim_cpu's folded input path, is traced as a
    higher-order op whose forward and backward are subgraphs)."""
    seen = []

    def backend(gm, example_inputs):
        for mod in gm.modules():
            if isinstance(mod, torch.fx.GraphModule):
                seen.extend(str(n.target) for n in mod.graph.nodes if n.op == "call_function")
        return gm

    out = torch.compile(rim, fullgraph=True, backend=backend)(x)[0]
    return out, [name for name in seen if "rims_fast" in name and "bwd" not in name]


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_one_op_per_sequence(backend):
    if rims_fast.available_backends("cpu")[backend] is not None:
        pytest.skip(rims_fast.available_backends("cpu")[backend])
    torch._dynamo.reset()
    torch.manual_seed(0)
    rim = rims_fast.RIM(5, 3, 4, 2, input_heads=2, comm_heads=2, backend=backend)
    x = torch.randn(6, 2, 5)
    out, ops = _sequence_ops(rim, x)
    op = {"cpu": "rim_cpu_kv_fwd", "triton": "rim_triton_fwd"}[backend]
    assert len(ops) == 1 and op in ops[0], ops
    torch.testing.assert_close(out, rim(x)[0], atol=0, rtol=0)


def test_one_op_per_short_call_cpu():
    """A one-step call at the paper layer (an RL rollout step; the input term folded, the fold
    made in the graph as in every call): still one op under torch.compile, equal to eager."""
    if rims_fast.available_backends("cpu")["cpu"] is not None:
        pytest.skip(rims_fast.available_backends("cpu")["cpu"])
    torch._dynamo.reset()
    torch.manual_seed(0)
    rim = rims_fast.RIM(64, 100, 6, 4, backend="cpu")
    x = torch.randn(1, 1, 64)
    out, ops = _sequence_ops(rim, x)
    assert len(ops) == 1 and "rim_cpu_kv_fwd" in ops[0], ops
    # The key/value projections are compiled matmuls outside the op: round-off, not bit-exact.
    torch.testing.assert_close(out, rim(x)[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T,B,heads", [(6, 2, 1), (1, 1, 2)],
                         ids=["dense-fold-grad", "factor-fold-grad-2-heads"])
def test_compiled_training_step_matches_eager(T, B, heads):
    """The folded input path's weight gradients, dense (T*B rows above rim_cpu's threshold) and
    from per-row factors (one step), under torch.compile as in eager."""
    if rims_fast.available_backends("cpu")["cpu"] is not None:
        pytest.skip(rims_fast.available_backends("cpu")["cpu"])
    torch._dynamo.reset()
    torch.manual_seed(0)
    rim = rims_fast.RIM(5, 3, 4, 2, input_heads=heads, backend="cpu", dtype=torch.float64)
    x = torch.randn(T, B, 5, dtype=torch.float64)
    from rims_fast import rim_cpu as rc
    assert rc.folds_input(1, 5, rim.config)
    GH = 4 * rim.config.hidden_size
    assert rc.fold_grad_from_factors(T * B, 5, GH) == (T * B == 1)
    rim(x)[0].square().sum().backward()
    eager = [p.grad.clone() for p in rim.parameters()]
    rim.zero_grad()
    torch.compile(rim, fullgraph=True, backend="aot_eager")(x)[0].square().sum().backward()
    for g, p in zip(eager, rim.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-12)


def test_persistent_kernels_one_op_and_training_step():
    """The persistent kernels' op (rims_fast::rim_seq, here its host run on CPU tensors): one node
    under torch.compile(fullgraph=True), and a compiled training step (aot_eager, so the backward
    kernel runs through the registered autograd) equals eager."""
    from rims_fast import rim_seq as rs
    if rs.unavailable_reason(torch.device("cpu"), torch.float64) is not None:
        pytest.skip(rs.unavailable_reason(torch.device("cpu"), torch.float64))
    torch._dynamo.reset()
    torch.manual_seed(0)
    rim = rims_fast.RIM(5, 3, 4, 2, input_heads=2, comm_heads=2, dtype=torch.float64)
    x = torch.randn(6, 2, 1, 5, dtype=torch.float64)
    h0 = torch.zeros(2, 4, 3, dtype=torch.float64)
    P = dict(rim.named_parameters())

    def f(x):
        return rs.rim_seq(x, h0, h0, P, rim.config)[0]

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    out = torch.compile(f, fullgraph=True, backend=backend)(x)
    assert [s for s in seen if "rims_fast" in s] == ["rims_fast.rim_seq.default"], seen
    torch.testing.assert_close(out, f(x), atol=0, rtol=0)
    f(x).square().sum().backward()
    eager = [p.grad.clone() for p in rim.parameters()]
    rim.zero_grad()
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    for g, p in zip(eager, rim.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-12)


def test_assume_constant_result_sets_torchs_mark():
    """rims_fast's decorator (it spares ``import rims_fast`` the import of ``torch._dynamo``) marks
    a function exactly as ``torch.compiler.assume_constant_result`` does."""
    def ours():
        return 0

    def torchs():
        return 0

    torch.compiler.assume_constant_result(torchs)
    _backend.assume_constant_result(ours)
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}
    for fn in (_backend.resolve, rim_cpu.unavailable_reason, rim_seq.unavailable_reason):
        assert fn._dynamo_marked_constant is True, fn


def test_import_loads_neither_dynamo_nor_triton():
    """``import rims_fast`` adds little to ``import torch``: ``torch._dynamo`` (about a second,
    and it imports Triton) loads only for torch.compile, Triton at the Triton backend's first use."""
    script = ("import sys, torch; heavy = {'torch._dynamo', 'triton'}; before = heavy & "
              "set(sys.modules); import rims_fast; print(sorted(heavy & set(sys.modules) - before))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
