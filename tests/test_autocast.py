"""Under ``torch.autocast`` a layer computes as without it (SPEC.md "Dtypes": input, state,
parameters and output share one dtype): every backend runs with autocast off for its device
(``rims_fast._backend.no_autocast``), so outputs, states, masks and gradients are bit-identical
and stay float32. Before, the reference's products dropped to bfloat16 and the C++ backends
raised (their PyTorch glue handed the ops bfloat16 keys)."""

import pytest
import torch

import rims_fast

CPU_BACKENDS = [b for b in ("torch", "cpu") if rims_fast.available_backends("cpu")[b] is None]
GPU = torch.cuda.is_available()


def _run(make, x):
    torch.manual_seed(0)
    m = make()
    res = m(x)  # RIM, BRIM: out, state(s); RIMCell: (h, c), masks
    flat = []
    for r in res:
        for s in (r if isinstance(r, (list, tuple)) else [r]):
            flat += list(s) if isinstance(s, tuple) else [s]
    return [t for t in flat if t.is_floating_point()], m


def _grads(flat, m, x):  # outside autocast, as PyTorch's AMP recipe runs backward
    return torch.autograd.grad(sum(t.float().square().sum() for t in flat), [x, *m.parameters()])


def _check(make, device, x):
    want, m = _run(make, x)
    g_want = _grads(want, m, x)
    with torch.autocast(device, dtype=torch.bfloat16):
        got, m = _run(make, x)
    g_got = _grads(got, m, x)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rim_ignores_autocast_cpu(backend, cell):
    x = torch.randn(4, 3, 7, requires_grad=True)
    _check(lambda: rims_fast.RIM(7, 5, 4, 2, cell=cell, backend=backend), "cpu", x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rimcell_and_brim_ignore_autocast_cpu(backend):
    x = torch.randn(3, 7, requires_grad=True)
    _check(lambda: rims_fast.RIMCell(7, 5, 4, 2, backend=backend), "cpu", x)
    xs = torch.randn(4, 3, 7, requires_grad=True)
    _check(lambda: rims_fast.BRIM(7, [5, 6], 4, 2, backend=backend), "cpu", xs)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_rim_ignores_autocast_cuda(backend):
    why = rims_fast.available_backends("cuda")[backend]
    if why is not None:
        pytest.skip(why)
    x = torch.randn(6, 5, 16, device="cuda", requires_grad=True)
    _check(lambda: rims_fast.RIM(16, 8, 4, 2, backend=backend, device="cuda"), "cuda", x)
