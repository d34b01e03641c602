"""rims_fast.row_products: the weight-gradient row sums against einsum in float64, and their
no-copy property (the reason they exist: einsum copies (T, B, K, width) operands)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rims_fast.row_products import mechanism_rows_product, rows_product

from helpers import assert_close

SHAPES = [(1, 1, 1, 1, 1), (3, 5, 2, 7, 4), (6, 16, 8, 32, 96)]  # T, B, K, X, Y


def _operands(T, B, K, X, Y, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(T, B, K, X, generator=g, dtype=torch.float64)
    y = torch.randn(T, B, K, 2 * Y, generator=g, dtype=torch.float64)[..., :Y]  # a slice, as dg
    return a.to(dtype), y.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mechanism_rows_product_matches_einsum(shape, dtype):
    a, y = _operands(*shape, dtype)
    expected = torch.einsum("tbkx,tbky->kxy", a.double(), y.double())
    assert_close("rows_product", mechanism_rows_product(a, y), expected, dtype, "grad_w")


@pytest.mark.parametrize("shape", SHAPES)
def test_rows_product_matches_einsum(shape):
    T, B, K, X, Y = shape
    a, y = _operands(T, B, K, X, Y, torch.float64)
    assert_close("rows_product", rows_product(a, y), torch.einsum("tbkx,tbky->xy", a, y),
                 torch.float64, "grad_w")


def _copies(fn) -> list:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(e.key, e.input_shapes) for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::copy_", "aten::clone", "aten::contiguous")]


def test_mechanism_rows_product_copies_nothing():
    a, y = _operands(4, 6, 3, 8, 5, torch.float32)
    # The regression this guards: einsum's alphabetical (b, t) order copies both operands.
    assert _copies(lambda: torch.einsum("tbkx,tbky->kxy", a, y)), "einsum stopped copying?"
    assert _copies(lambda: mechanism_rows_product(a, y)) == []


def test_mechanism_rows_product_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="want"):
        mechanism_rows_product(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 5, 5))
