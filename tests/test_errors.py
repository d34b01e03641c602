"""Every bad input of SPEC.md's "Errors" list gets a clear ValueError/TypeError naming it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import rims_fast
from rims_fast import _backend

OK = dict(input_size=4, hidden_size=3, num_units=4, top_k=2)


@pytest.mark.parametrize("override, match", [
    ({"input_size": 0}, "input_size"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"num_units": 0}, "num_units"),
    ({"input_heads": 0}, "input_heads"),
    ({"input_key_size": 0}, "input_key_size"),
    ({"input_value_size": 0}, "input_value_size"),
    ({"comm_heads": 0}, "comm_heads"),
    ({"comm_key_size": 0}, "comm_key_size"),
    ({"comm_value_size": 0}, "comm_value_size"),
    ({"hidden_size": 2.5}, "hidden_size"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"input_dropout": 1.0}, "input_dropout"),
    ({"comm_dropout": -0.1}, "comm_dropout"),
    ({"cell": "rnn"}, "cell"),
    ({"input_heads": 5}, "input_value_size"),  # 4*H = 12 not divisible by 5
    ({"backend": "cudnn"}, "backend"),
    ({"num_units": 0, "top_k": 9}, "num_units"),  # sizes are checked before top_k
])
def test_construction_errors(override, match):
    with pytest.raises(ValueError, match=match):
        rims_fast.RIM(**{**OK, **override})


def test_defaults_follow_spec():
    rim = rims_fast.RIM(**OK)
    assert rim.config.input_value_size == 4 * 3  # 4*hidden_size // input_heads
    shapes = {n: tuple(p.shape) for n, p in rim.named_parameters()}
    assert shapes == {
        "input_key": (4, 64), "input_value": (4, 12), "input_query": (4, 3, 64),
        "weight_ih": (4, 12, 12), "weight_hh": (4, 3, 12), "bias_ih": (4, 12), "bias_hh": (4, 12),
        "comm_query": (4, 3, 128), "comm_key": (4, 3, 128), "comm_value": (4, 3, 128),
        "comm_output": (4, 128, 3)}
    gru = rims_fast.RIM(**OK, cell="gru")
    assert gru.weight_hh.shape == (4, 3, 9)


def test_reset_parameters_bounds():
    rim = rims_fast.RIM(**OK, dtype=torch.float64)
    for name, p in rim.named_parameters():
        bound = rim.config.init_bound(name)
        assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound, name
    assert rim.config.init_bound("weight_hh") == pytest.approx(3 ** -0.5, rel=1e-15)
    assert rim.config.init_bound("comm_output") == pytest.approx(128 ** -0.5, rel=1e-15)


def test_factory_kwargs():
    rim = rims_fast.RIM(**OK, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in rim.parameters())


@pytest.fixture
def rim():
    return rims_fast.RIM(**OK)


@pytest.mark.parametrize("x, exc, match", [
    (torch.zeros(2, 3, 4, dtype=torch.long), TypeError, "floating"),
    (torch.zeros(3, 4), ValueError, "dim"),
    (torch.zeros(1, 2, 3, 4, 4), ValueError, "dim"),
    (torch.zeros(2, 3, 5), ValueError, "shape.*input_size=4"),
    (torch.zeros(0, 3, 4), ValueError, r"shape.*T and B must be >= 1 \(got T=0\)"),
    (torch.zeros(2, 0, 4), ValueError, r"shape.*T and B must be >= 1 \(got B=0\)"),
    (torch.zeros(2, 3, 0, 4), ValueError, r"shape.*T, B and M must be >= 1 \(got M=0\)"),
    (torch.zeros(2, 3, 4, dtype=torch.float64), TypeError, "dtype"),
])
def test_bad_input(rim, x, exc, match):
    with pytest.raises(exc, match=match):
        rim(x)


def test_not_a_tensor(rim):
    with pytest.raises(TypeError, match="x"):
        rim([[1.0]])


@pytest.mark.parametrize("state, exc, match", [
    (torch.zeros(3, 4, 3), TypeError, "tuple"),
    ((torch.zeros(3, 4, 3),), TypeError, "tuple"),
    ((torch.zeros(3, 4, 3), torch.zeros(3, 4, 2)), ValueError, "c_0.*shape"),
    ((torch.zeros(2, 4, 3), torch.zeros(3, 4, 3)), ValueError, "h_0.*shape"),
    ((torch.zeros(4, 3), torch.zeros(3, 4, 3)), ValueError, "h_0.*dim"),
    ((torch.zeros(3, 4, 3, dtype=torch.float64), torch.zeros(3, 4, 3)), TypeError, "h_0.*dtype"),
    ((torch.zeros(3, 4, 3), torch.zeros(3, 4, 3, dtype=torch.int32)), TypeError, "c_0.*floating"),
])
def test_bad_lstm_state(rim, state, exc, match):
    with pytest.raises(exc, match=match):
        rim(torch.zeros(2, 3, 4), state)


def test_bad_gru_state():
    gru = rims_fast.RIM(**OK, cell="gru")
    with pytest.raises(TypeError, match="Tensor h_0"):
        gru(torch.zeros(2, 3, 4), (torch.zeros(3, 4, 3), torch.zeros(3, 4, 3)))
    with pytest.raises(ValueError, match="shape"):
        gru(torch.zeros(2, 3, 4), torch.zeros(3, 4, 4))


def test_batch_first_state_is_batch_major():
    rim = rims_fast.RIM(**OK, batch_first=True)
    out, (h, c) = rim(torch.zeros(3, 2, 4))  # (B=3, T=2, D)
    assert out.shape == (3, 2, 12) and h.shape == (3, 4, 3)


def test_zero_size_names_batch_first_dims():
    rim = rims_fast.RIM(**OK, batch_first=True)
    with pytest.raises(ValueError, match=r"B and T must be >= 1 \(got B=0\)"):
        rim(torch.zeros(0, 2, 4))


def test_rimcell_input_checks():
    cell = rims_fast.RIMCell(**OK)
    with pytest.raises(ValueError, match="dim"):
        cell(torch.zeros(2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"B and M must be >= 1 \(got M=0\)"):
        cell(torch.zeros(3, 0, 4))
    (h, c), mask = cell(torch.zeros(3, 4))
    assert h.shape == (3, 4, 3) and mask.shape == (3, 4)


def test_explicit_unavailable_backend_raises_auto_does_not():
    from rims_fast import rim_cpu
    cpu_why = rim_cpu.unavailable_reason(torch.device("cpu"), torch.float32)
    cpu = rims_fast.RIM(**OK, backend="cpu")
    if cpu_why is not None:  # the C++ sequence driver is not built here
        with pytest.raises(RuntimeError, match="rims_fast._C|C\\+\\+ sequence driver"):
            cpu(torch.zeros(2, 3, 4))
    else:
        cpu(torch.zeros(2, 3, 4))
        assert cpu.last_backend == "cpu"
    cuda = rims_fast.RIM(**OK, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        cuda(torch.zeros(2, 3, 4))
    auto = rims_fast.RIM(**OK)
    auto(torch.zeros(2, 3, 4))
    assert auto.last_backend == ("torch" if cpu_why is not None else "cpu")


def test_available_backends_reports_reasons():
    av = rims_fast.available_backends("cpu")
    assert av["torch"] is None
    assert isinstance(av["cuda"], str)
    from rims_fast import rim_cpu
    assert av["cpu"] == rim_cpu.unavailable_reason(torch.device("cpu"), torch.float32)
    assert isinstance(rims_fast.available_backends("meta")["cpu"], str)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPU")
def test_no_backend_on_cuda_without_gpu():
    """The per-backend checks look at the build; without a GPU none can run on CUDA tensors."""
    why = "CUDA is not available (torch.cuda.is_available() is False)"
    assert rims_fast.available_backends("cuda") == {n: why for n in rims_fast.BACKENDS[1:]}


def test_last_backend_set_only_after_the_run(monkeypatch):
    rim = rims_fast.RIM(**OK, backend="torch")
    rim(torch.zeros(2, 3, 4))

    def failing(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(_backend, "runner", lambda name: failing)
    rim.backend = "cpu" if rims_fast.available_backends("cpu")["cpu"] is None else "torch"
    with pytest.raises(RuntimeError, match="kernel failed"):
        rim(torch.zeros(2, 3, 4))
    assert rim.last_backend == "torch"  # the backend that last ran, not the one that failed


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_interpret_set_after_import_is_reported():
    """TRITON_INTERPRET counts as set at ``import rims_fast`` (Triton reads it when imported, which
    that import used to do; now at first use, but the rule stays): setting it later must not pass
    the availability check (it used to, then crash inside the first launch)."""
    script = """if True:
        import os, torch, rims_fast
        os.environ["TRITON_INTERPRET"] = "1"
        print("WHY", rims_fast.available_backends("cpu")["triton"])
        rim = rims_fast.RIM(4, 3, 2, 1, backend="triton")
        try:
            rim(torch.zeros(2, 2, 4))
        except RuntimeError as e:
            print("RAISED", e)
        print("LAST", rim.last_backend)
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert "set it before `import rims_fast`" in lines["WHY"]
    assert lines["RAISED"] == lines["WHY"]
    assert lines["LAST"] == "None"


@pytest.mark.parametrize("make", [lambda np: rims_fast.RIM(4, np.int64(3), np.int32(4), np.int64(2)),
                                  lambda np: rims_fast.RIM(4, 3, 4, torch.tensor(2))])
def test_integer_like_sizes_are_accepted_as_int(make):
    np = pytest.importorskip("numpy")
    rim = make(np)
    for name in ("hidden_size", "num_units", "top_k"):
        assert type(getattr(rim.config, name)) is int, name
    assert rim(torch.zeros(2, 3, 4))[0].shape == (2, 3, 12)


def test_non_integer_sizes_still_rejected():
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="num_units must be a positive int"):
        rims_fast.RIM(4, 3, np.float64(4.0), 2)
    with pytest.raises(ValueError, match="top_k"):
        rims_fast.RIM(4, 3, 4, np.True_)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float32"])
def test_non_floating_factory_dtype(dtype):
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        rims_fast.RIM(**OK, dtype=dtype)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        rims_fast.BRIM(4, 3, 4, 2, dtype=dtype)


def test_unknown_kwarg_names_the_public_class():
    with pytest.raises(TypeError, match=r"^RIMCell\.__init__\(\) got an unexpected keyword "
                                        r"argument 'batch_first'"):
        rims_fast.RIMCell(**OK, batch_first=True)
    with pytest.raises(TypeError, match=r"^RIM\.__init__\(\) got an unexpected keyword argument 'hx'"):
        rims_fast.RIM(**OK, hx=None)


@pytest.mark.parametrize("value", ["False", 0, None])
def test_batch_first_must_be_bool(value):
    with pytest.raises(ValueError, match="batch_first must be a bool"):
        rims_fast.RIM(**OK, batch_first=value)
    with pytest.raises(ValueError, match="batch_first must be a bool"):
        rims_fast.BRIM(4, 3, 4, 2, batch_first=value)


def test_repr_shows_sizes_then_non_defaults():
    """As ``nn.LSTM``'s: the sizes, then only the keyword arguments that differ from their
    defaults, in the constructor's order; the repr is a constructor call for the same config."""
    assert repr(rims_fast.RIM(64, 100, 6, 4)) == "RIM(64, 100, num_units=6, top_k=4)"
    assert repr(rims_fast.RIMCell(64, 100, 6, 4)) == "RIMCell(64, 100, num_units=6, top_k=4)"
    # input_value_size equal to what None derives (4*100 // 1) is not a choice: not shown.
    rim = rims_fast.RIM(64, 100, 6, 4, backend="cpu", batch_first=True, comm_dropout=0.1,
                        input_value_size=400, cell="gru", block_inactive_grad=False, comm_heads=2)
    assert repr(rim) == ("RIM(64, 100, num_units=6, top_k=4, cell='gru', comm_heads=2, "
                         "comm_dropout=0.1, block_inactive_grad=False, batch_first=True, "
                         "backend='cpu')")
    cell = rims_fast.RIMCell(8, 16, 4, 2, input_heads=3, input_value_size=5, input_dropout=0.25,
                             backend="torch")
    assert repr(cell) == ("RIMCell(8, 16, num_units=4, top_k=2, input_heads=3, input_value_size=5, "
                          "input_dropout=0.25, backend='torch')")
    for m in (rim, cell):
        assert eval(repr(m), vars(rims_fast)).config == m.config
