"""Triton kernels of rims_fast, installed as rims_fast.triton_kernels (launchers only; no autograd here)."""
