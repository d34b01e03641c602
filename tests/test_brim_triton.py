"""``BRIM(backend="triton")`` (rims_fast.brim_triton: the Triton RIM kernels one layer-step at a
time, backward by recompute) against the float64 ``brim_ref``: outputs, final states and every
gradient under the backend's own masks (and, with dropout, its own keep-masks); masks against the
reference's competition where it is not within round-off of a tie.

Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (conftest.py), so the
shapes are tiny (each layer-step is two interpreted launches)."""

from __future__ import annotations

import pytest
import torch

import rims_fast
from brim_compare import assert_brim_close, clone_states, pairs
from helpers import assert_close
from test_brim import brim_states, make_brim

pytestmark = pytest.mark.triton

bt = pytest.importorskip("rims_fast.brim_triton")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if bt.unavailable_reason(DEV, torch.float32) is not None:
    pytest.skip(bt.unavailable_reason(DEV, torch.float32), allow_module_level=True)


def _compare(dtype, training=False, T=3, B=3, M=2, **kw):
    brim64 = make_brim(**kw)
    x64 = torch.randn(T, B, M, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x64.requires_grad_(True)
    s64 = clone_states(brim_states(brim64, B), torch.float64, "cpu")
    brim_d = make_brim(dtype=dtype, **kw).to(DEV)
    brim_d.load_state_dict({k: v.to(dtype) for k, v in brim64.state_dict().items()})
    xd = x64.detach().to(DEV, dtype).requires_grad_(True)
    sd = clone_states(s64, dtype, DEV)
    P = [dict(layer.named_parameters()) for layer in brim_d.layers]
    got = bt.brim_triton(xd, pairs(sd), P, brim_d.configs, training=training, seed=777)
    keep = None
    if training:
        keep = bt.dropout_masks(777, T, B, M, brim_d.configs, DEV)
        keep = [tuple(k.cpu() if k is not None else None for k in pair) for pair in keep]
    P64 = [dict(layer.named_parameters()) for layer in brim64.layers]
    masks = [m.cpu() for m in got[2]]
    want = rims_fast.brim_ref(x64, pairs(s64), P64, brim64.configs, masks=masks,
                              training=training, dropout_masks=keep)
    if not training:  # the competition itself: exact unless within round-off of a tie
        free = rims_fast.brim_ref(x64.detach(), pairs(s64), P64, brim64.configs)[2]
        differ = sum(int((a != b).any(-1).sum()) for a, b in zip(masks, free))
        assert differ == 0 or dtype != torch.float32, f"{differ} mask rows differ in float32"
    assert_brim_close(got, want, brim_d, xd, sd, brim64, x64, s64, dtype)
    return got


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_three_layers_float32(cell):
    _compare(torch.float32, cell=cell)


def test_two_layers_bfloat16():
    _compare(torch.bfloat16, hidden_sizes=[3, 4], num_units=[4, 3], top_k=[2, 1])


def test_one_layer_top_k_equals_K_float16():
    _compare(torch.float16, hidden_sizes=[3], num_units=[3], top_k=[3], T=2)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_replayed_in_recompute(cell):
    got = _compare(torch.float32, training=True, cell=cell, input_dropout=0.3, comm_dropout=0.4,
                   hidden_sizes=[3, 4], num_units=[4, 3], top_k=[2, 1])
    assert all(torch.isfinite(o).all() for o in got[0])


def test_module_backend_triton():
    brim = make_brim(backend="triton", dtype=torch.float32).to(DEV)
    x = torch.randn(2, 2, 5, device=DEV)
    out, states = brim(x)
    assert brim.last_backend == "triton"
    brim.backend = "torch"
    ref, _ = brim(x)
    assert_close("out", out, ref, torch.float32)
