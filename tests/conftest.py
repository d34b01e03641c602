"""Test tiers (STYLE.md): plain tests run everywhere; ``triton`` tests run on CPU tensors through
the Triton interpreter when there is no GPU; ``gpu`` tests need CUDA and are skipped otherwise."""

import os

import torch

# The interpreter must be chosen before triton is first imported (it reads the variable then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
