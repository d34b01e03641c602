"""Races in the CUDA kernels' phases, found on the host.

On the GPU a phase's items (rim_seq_{fwd,bwd}.cuh, rim_step_{fwd,bwd}.cuh: one thread or warp
each, then a barrier) run concurrently; the host runs (HostExec) run them one after another, so
an item that reads what another item of the same phase writes passes every host test in order
and races on the device. Running each phase's items reversed and in a permutation that changes
every phase, and requiring the same bits as in order, shows such a dependency wherever it moves
a value (the rank rule's ties, the softmax sums, the staged copies and every saved history are
among the 344 cases' outputs: tests/host_cases.py). Exact equality is the right test: a race-free
phase computes each item's result from the same inputs in the same order whatever the items'
order.
"""

from __future__ import annotations

import pytest
import torch

from rims_fast import rim_seq as rs

_WHY = rs.unavailable_reason(torch.device("cpu"), torch.float64)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"rim_seq_fwd not built: {_WHY}")

ORDERS = {1: "reversed", 2: "permuted"}


def _set_order(mode: int) -> int:
    from rims_fast import _C
    return _C._set_host_item_order(mode)


def _differences(cases, mode):
    import host_cases
    cases = list(cases)
    old = _set_order(0)
    try:
        want = host_cases.collect(cases)
        _set_order(mode)
        got = host_cases.collect(cases)
    finally:
        _set_order(old)
    diffs = [f"{k}: {len(got[k])} outputs, {len(want[k])} in order" for k in want
             if len(got[k]) != len(want[k])]
    return diffs + [f"{k} output {i}" for k in want
                    for i, (a, b) in enumerate(zip(want[k], got[k]))
                    if a.shape != b.shape or not torch.equal(a, b)]


@pytest.mark.parametrize("mode", ORDERS, ids=ORDERS.get)
@pytest.mark.parametrize("group", ["persistent_forward", "gradient", "wide", "fused"])
def test_host_item_order_changes_no_bit(mode, group):
    import host_cases
    cases = getattr(host_cases, f"{group}_cases")()
    diffs = _differences(cases, mode)
    assert not diffs, f"{len(diffs)} outputs depend on the item order: " + ", ".join(diffs[:8])


def test_order_hook_is_applied():
    # The bit-identity above would pass vacuously if the order never reached the kernels' phases:
    # the probe runs one HostExec phase in the extension and returns the indices as visited.
    # (That the orders expose a racy phase is csrc/tests/test_host_exec.cpp's, ctest host_exec.)
    from rims_fast import _C
    old = _set_order(0)
    try:
        assert _C._host_item_order_probe(10) == list(range(10))
        _set_order(1)
        assert _C._host_item_order_probe(10) == list(range(9, -1, -1))
        _set_order(2)
        first = _C._host_item_order_probe(10)
        assert sorted(first) == list(range(10)) and first != list(range(10))
        seen = {tuple(first)} | {tuple(_C._host_item_order_probe(10)) for _ in range(9)}
        assert len(seen) > 3  # a new permutation per phase
        _set_order(2)  # setting the order restarts the sequence: the same first permutation
        assert _C._host_item_order_probe(10) == first
    finally:
        _set_order(old)


def test_order_hook_returns_previous_and_checks():
    assert _set_order(0) == 0
    assert _set_order(1) == 0
    assert _set_order(2) == 1
    assert _set_order(0) == 2
    with pytest.raises(RuntimeError, match="mode must be"):
        _set_order(3)
    assert _set_order(0) == 0


def test_host_runs_write_every_output_element():
    # Under pytest every torch.empty / at::empty is NaN-filled (conftest.py), so the host runs'
    # outputs and scratch start as NaN, their shared memory too (host_exec.h), and every input
    # here is finite: a NaN anywhere in the results (the 13 forward outputs with the 9 saved
    # histories, every gradient) is an element no kernel wrote, or a read of one, which on the
    # GPU would be whatever memory held.
    import host_cases
    res = host_cases.collect()
    bad = [f"{k} output {i}" for k, outs in res.items() for i, t in enumerate(outs)
           if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{len(bad)} outputs hold unwritten elements: " + ", ".join(bad[:8])
