"""Bit-identity of the CUDA ops' host runs across a kernel change that should not move a bit.

The persistent and stepped kernels' tile functions run on the host in CI (HostExec). A change
that only reorganises work (splits a phase into more items, stages operands in shared memory)
must keep every result bit for bit: save the outputs before the change, rebuild, check after.

    python tools/host_bitcheck.py save /tmp/before.pt     # with the old build
    python tools/host_bitcheck.py check /tmp/before.pt    # with the new one

The cases are tests/host_cases.py's (344: persistent forward with all 13 outputs, persistent and
stepped gradients, 20 of larger phases, and 40 of the stepped forward's fused kernels; a file
saved with an older case set no longer matches: save it again with the old build).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from host_cases import collect  # noqa: E402


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "check"):
        raise SystemExit(__doc__)
    mode, path = sys.argv[1:]
    res = collect()
    if mode == "save":
        torch.save(res, path)
        print(f"saved {len(res)} cases to {path}")
        return
    ref = torch.load(path)
    if ref.keys() != res.keys():
        raise SystemExit("the saved cases differ from this version's: regenerate with 'save'")
    bad = [(k, i) for k in ref for i, (a, b) in enumerate(zip(ref[k], res[k]))
           if a.shape != b.shape or not torch.equal(a, b)]
    for k, i in bad:
        print("DIFF", k, "output", i)
    print(f"checked {len(ref)} cases: {len(bad)} outputs differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
