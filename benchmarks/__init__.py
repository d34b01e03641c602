"""rims-bench: benchmarks of rims_fast (``python -m benchmarks``; see README.md here)."""
