"""``python -m rims_fast.info``: versions, build metadata, and which backends can run here."""

from __future__ import annotations

import platform
import sys

import torch

import rims_fast
from rims_fast import _backend


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError as e:
        return f"not installed ({e})"


def _build() -> dict:
    try:
        from rims_fast import _build_info
        return {k: v for k, v in vars(_build_info).items() if not k.startswith("_")}
    except ImportError:
        return {"build": "no build metadata (source tree, not installed with setup.py)"}


def _modes() -> dict:
    """The environment switches that pick an implementation inside a backend."""
    import os
    from rims_fast import rim_seq
    res = {"RIMS_FAST_CUDA_FWD": f"{rim_seq.cuda_fwd_mode()} (backend='cuda': 'auto' = per layer "
                                 "'persistent' or 'stepped' by weight elements per step (> "
                                 f"{rim_seq.STEPPED_MIN_WEIGHTS}: stepped), 'persistent' = rim_seq "
                                 "kernels, 'stepped' = rim_steps ops, 'cell' = reference loop + fused "
                                 "cell)",
           "RIMS_FAST_CUDA_TILE": f"{rim_seq.tile_size()} (0 = automatic)",
           "RIMS_FAST_CUDA_MMA": os.environ.get("RIMS_FAST_CUDA_MMA", "0")
           + " (1 = the persistent kernels' weight products on tensor cores, float16/bfloat16)",
           "RIMS_FAST_CUDA_CLUSTER": os.environ.get("RIMS_FAST_CUDA_CLUSTER", "0")
           + " (1 = the persistent forward on thread-block clusters, sm_90+)",
           "RIMS_FAST_CUDA_CLUSTER_BLOCKS": os.environ.get("RIMS_FAST_CUDA_CLUSTER_BLOCKS", "8")
           + " (with clusters: the most blocks per cluster, ceil(K / min(N, K)) mechanisms each)",
           "RIMS_FAST_CUDA_RESIDENT": os.environ.get("RIMS_FAST_CUDA_RESIDENT", "1")
           + " (with clusters: 1 = weights in shared memory as fit, 0 = none)",
           "RIMS_FAST_CUDA_XW": os.environ.get("RIMS_FAST_CUDA_XW", "auto")
           + " (the persistent kernels' input term hoisted out of the recurrence: auto, 1, 0)",
           "RIMS_FAST_CUDA_WIDE": os.environ.get("RIMS_FAST_CUDA_WIDE", "1")
           + " (1 = tile-1 persistent kernels on CUDA cores run 512-thread blocks, 0 = 256)",
           "RIMS_FAST_CUDA_PDL": os.environ.get("RIMS_FAST_CUDA_PDL", "0")
           + " (1 = the stepped ops' phase kernels use programmatic dependent launch, sm_90+)",
           "RIMS_FAST_CUDA_FUSED": os.environ.get("RIMS_FAST_CUDA_FUSED", "0")
           + " (1 = the stepped forward's gate product + LSTM cell and output product + residual"
           " as tensor-core kernels)",
           "RIMS_FAST_CUDA_GRAPH": os.environ.get("RIMS_FAST_CUDA_GRAPH", "0")
           + " (1 = backend='cuda' persistent/stepped no-grad forward replays a CUDA graph)"}
    try:
        from rims_fast import rim_triton
        res["RIMS_FAST_TRITON_BWD"] = rim_triton.bwd_mode()
        res["RIMS_FAST_TRITON_GRAPH"] = str(int(rim_triton.graph_mode()))
    except ImportError as e:
        res["triton switches"] = f"n/a ({e})"
    res["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    return res


def report() -> str:
    from rims_fast import masked_cell
    lines = [
        f"rims_fast {rims_fast.__version__}",
        f"python    {sys.version.split()[0]} ({platform.machine()})",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda}, cuda available: "
        f"{torch.cuda.is_available()})",
        f"triton    {_triton_version()}",
        f"extension rims_fast._C: {'loaded' if masked_cell.HAVE_C else masked_cell.C_IMPORT_ERROR}",
    ]
    lines += [f"  build.{k} = {v}" for k, v in _build().items()]
    lines += ["implementation switches (environment, read at each call):"]
    lines += [f"  {k} = {v}" for k, v in _modes().items()]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        if dev == "cuda":
            lines.append(f"device cuda: {torch.cuda.get_device_name()}")
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            lines.append(f"backends on {dev}/{str(dtype).replace('torch.', '')}:")
            for name, why in rims_fast.available_backends(dev, dtype).items():
                lines.append(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
            lines.append(f"  auto -> {_backend.resolve('auto', torch.device(dev), dtype)}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
