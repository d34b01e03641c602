"""Test tiers (STYLE.md): plain tests run everywhere; ``triton`` tests run on CPU tensors through
the Triton interpreter when there is no GPU; ``gpu`` tests need CUDA and are skipped otherwise."""

import os

import torch

# The interpreter must be chosen before triton is first imported (it reads the variable then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    """Every torch.empty (Python or C++ at::empty) is filled with NaN during tests, so a kernel
    that skips a write shows up as NaN instead of passing on leftover memory (STYLE "Tests")."""
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    torch.utils.deterministic.fill_uninitialized_memory = prev[2]
