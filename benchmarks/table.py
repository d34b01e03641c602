"""``python -m benchmarks.table RESULTS.json``: the results as a Markdown table (for README.md).

Options: ``--modes fwd,fwd+bwd``, ``--configs paper,large`` (config or sweep names),
``--providers ...``, ``--all`` (also skipped rows). The conditions (device, dtype, versions, git
sha, threads, timing method) are printed above the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report import format_table


def _csv(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.table", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--modes", type=_csv, default=None)
    ap.add_argument("--configs", type=_csv, default=None, help="config names or sweep groups")
    ap.add_argument("--providers", type=_csv, default=None)
    ap.add_argument("--all", action="store_true",
                    help="include skipped rows and sweep points that repeat a config's shape")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    env, rows = data["environment"], data["rows"]
    sel = [r for r in rows
           if (args.all or (r["status"] != "skipped" and "reused_from" not in r))
           and (args.modes is None or r["mode"] in args.modes)
           and (args.configs is None or r["config"] in args.configs or r["group"] in args.configs)
           and (args.providers is None or r["provider"] in args.providers)]
    baseline = next((r["baseline"] for r in rows if r.get("baseline")), "lstm")
    cond = [f"{env['device']}", env["dtype"], f"torch {env['torch']}"]
    if env.get("cuda"):
        cond.append(f"CUDA {env['cuda']} (driver {env.get('driver')})")
    else:
        cond.append(f"{env['threads']} threads")
    if env.get("triton"):
        cond.append(f"triton {env['triton']}")
    cond += [f"git {str(env['git_sha'])[:12]}", env["date"][:10]]
    print(f"Conditions: {', '.join(cond)}. Timing: {env['timing']}. Peak memory: {env['memory']}. "
          f"fwd = forward under no_grad; bwd = backward alone; ratio = time / {baseline}'s time.")
    print()
    print(format_table(sel, markdown=True, baseline=baseline))
    skipped = data.get("skipped") or []
    if skipped:
        print()
        for s in skipped:
            print(f"- `{s['provider']}` skipped: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
