"""Every bad input of SPEC.md's "Errors" list gets a clear ValueError/TypeError naming it."""

from __future__ import annotations

import pytest
import torch

import rims_fast

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
    (torch.zeros(2, 3, 5), ValueError, "shape"),
    (torch.zeros(0, 3, 4), ValueError, "shape"),
    (torch.zeros(2, 3, 0, 4), ValueError, "shape"),
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


def test_rimcell_input_checks():
    cell = rims_fast.RIMCell(**OK)
    with pytest.raises(ValueError, match="dim"):
        cell(torch.zeros(2, 3, 3, 4))
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
