"""Test tiers (STYLE.md): plain tests run everywhere; ``triton`` tests run on CPU tensors through
the Triton interpreter when there is no GPU; ``gpu`` tests need CUDA and are skipped otherwise."""

import os

# Under pytest-xdist (`-n auto`) the workers share the cores: thread pools the size of the machine
# in every worker (torch's, and the BLAS under numpy that the Triton interpreter runs on) would
# oversubscribe them. Set before torch and numpy are imported, which read these once.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _SHARE)

import torch  # noqa: E402

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
