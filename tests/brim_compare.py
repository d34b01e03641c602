"""Shared by the BRIM backend tests: compare a backend's stack with the float64 reference on
outputs, final states and every gradient (x, every state, every parameter of every layer)."""

from __future__ import annotations

import torch

from helpers import assert_close


def pairs(states):
    """Per-layer states as ``(h, c)`` pairs (GRU states are ``h`` alone)."""
    return [s if isinstance(s, tuple) else (s, None) for s in states]


def clone_states(states, dtype, device):
    """Fresh leaves with the same values, in ``dtype`` on ``device``."""
    return [tuple(t.detach().to(device, dtype).requires_grad_(True) for t in s)
            if isinstance(s, tuple) else s.detach().to(device, dtype).requires_grad_(True)
            for s in states]


def _leaves(brim, x, states):
    flat = [t for s in states for t in (s if isinstance(s, tuple) else (s,))]
    return [x, *flat, *brim.parameters()]


def _loss(outs, finals, seed=5):
    """A fixed random projection of every output and final state (on the CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    terms = list(outs) + [t for hc in finals for t in hc if t is not None]
    return sum((t.double().cpu() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum()
               for t in terms)


def assert_brim_close(got, want, brim_got, x_got, states_got, brim_want, x_want, states_want,
                      dtype):
    """``got``/``want``: ``(outs, finals, masks)`` of the backend (in ``dtype``) and of the
    float64 reference; the modules, inputs and states are the leaves each was computed from."""
    for l in range(len(got[0])):
        assert got[0][l].dtype == dtype
        assert_close(f"out[{l}]", got[0][l], want[0][l], dtype)
        for name, a, b in zip(("h_n", "c_n"), got[1][l], want[1][l]):
            if b is not None:
                assert_close(f"{name}[{l}]", a, b, dtype)
    g_got = torch.autograd.grad(_loss(got[0], got[1]), _leaves(brim_got, x_got, states_got),
                                allow_unused=True)
    g_want = torch.autograd.grad(_loss(want[0], want[1]),
                                 _leaves(brim_want, x_want, states_want), allow_unused=True)
    n_params = len(list(brim_want.parameters()))
    names = ["x"] + [f"state{i}" for i in range(len(g_got) - 1 - n_params)]
    names += [n for n, _ in brim_want.named_parameters()]
    for name, a, b in zip(names, g_got, g_want):
        a = torch.zeros(1) if a is None else a
        b = torch.zeros(1) if b is None else b
        assert_close("d" + name, a, b, dtype, "grad_w" if "." in name else "grad_in")
