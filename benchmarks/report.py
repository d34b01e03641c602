"""Environment metadata, the printed/Markdown table, the JSON/CSV files and the sweep plot."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

from rims_fast._backend import tf32_matmul

__all__ = ["environment", "device_slug", "format_table", "save", "plot_sweeps", "fmt_bytes"]

ROW_FIELDS = ("provider", "config", "group", "mode", "status", "median_ms", "min_ms", "n",
              "ms_per_step", "tokens_per_s", "step_tflops", "peak_mem_bytes", "ratio", "baseline", "first_call_s",
              "B", "T", "M", "D", "K", "top_k", "H", "reason", "gate")


def _cmd(args: list[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=cwd)
    except Exception:  # noqa: BLE001 - tool missing
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    repo = str(Path(__file__).resolve().parent.parent)
    sha = _cmd(["git", "rev-parse", "HEAD"], cwd=repo)
    dirty = _cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        # GIT_SHA (tools/gpu_session.sh passes it on): where the tree was copied without current
        # git metadata, as on the device machines, whose git reported a stale commit.
        "git_sha": os.environ.get("GIT_SHA") or ((sha + ("-dirty" if dirty else "")) if sha
                                                 else "unknown (no git or no commit)"),
        "rims_fast_backends": {},
        "loadavg_start": _loadavg(),
    }
    try:
        import rims_fast
        env["rims_fast"] = rims_fast.__version__
        env["rims_fast_backends"] = rims_fast.available_backends(device, dtype)
    except Exception:  # noqa: BLE001
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, cuda=torch.version.cuda,
                   driver=_cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                   sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=tf32_matmul())
    else:
        env.update(device=env["cpu"], cuda=None, driver=None)
    return env


def device_slug(env: dict) -> str:
    name = env["device"]
    name = re.sub(r"\((R|TM|tm|r)\)", "", name)
    name = re.sub(r"CPU @.*", "", name)
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if env["device_type"] == "cpu" and not s.startswith("cpu"):
        s = "cpu-" + s
    return s or env["device_type"]


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _fmt_tok(v) -> str:
    if v is None:
        return ""
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def _fmt_ms(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def format_table(rows: list[dict], markdown: bool = False, baseline: str = "lstm") -> str:
    """provider x config x mode -> median ms, ms/step, tokens/s, peak memory, ratio to baseline."""
    head = ["config", "shape", "mode", "provider", "median ms", "min ms", "ms/step", "tokens/s",
            "step TFLOP/s", "peak mem", f"x {baseline}", "status"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        shape = f"B{r['B']} T{r['T']} D{r['D']} K{r['K']}/{r['top_k']} H{r['H']}"
        status = r["status"] if ok or not r.get("reason") else f"{r['status']}: {r['reason']}"
        if markdown and len(status) > 80:
            status = status[:77] + "..."
        body.append([
            r["config"], shape, r["mode"], r["provider"],
            _fmt_ms(r.get("median_ms")) if ok else "", _fmt_ms(r.get("min_ms")) if ok else "",
            _fmt_ms(r.get("ms_per_step")) if ok else "",
            _fmt_tok(r.get("tokens_per_s")) if ok else "",
            (f"{r['step_tflops']:.3g}" if r.get("step_tflops") is not None else "") if ok else "",
            fmt_bytes(r.get("peak_mem_bytes")) if ok else "",
            (f"{r['ratio']:.2f}" if r.get("ratio") is not None else "") if ok else "",
            status,
        ])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])  # the status column is free-running
    num = {4, 5, 6, 7, 8, 9, 10}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in num else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [fmt(head), fmt(["-" * w for w in widths])]
    prev = None
    for b in body:
        if prev is not None and b[0] != prev:
            out.append("")
        prev = b[0]
        out.append(fmt(b))
    return "\n".join(out)


def save(result: dict, outdir: Path, slug: str) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = outdir / f"{slug}.json", outdir / f"{slug}.csv"
    jpath.write_text(json.dumps(result, indent=1, default=str) + "\n")
    env = result["environment"]
    env_cols = ("device", "cuda", "driver", "cpu", "torch", "triton", "git_sha", "dtype", "threads", "date")
    with cpath.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(ROW_FIELDS) + list(env_cols))
        for r in result["rows"]:
            w.writerow([r.get(k) for k in ROW_FIELDS] + [env.get(k) for k in env_cols])
    return [jpath, cpath]


def plot_sweeps(rows: list[dict], path: Path, title: str = "") -> Optional[Path]:
    """Time per step vs T (sweep_T) and vs B (sweep_B), one line per provider, one row per mode.
    Returns the path, or None when no sweep data or no matplotlib."""
    sweeps = [g for g in ("sweep_T", "sweep_B") if any(r["group"] == g and r["status"] == "ok" for r in rows)]
    if not sweeps:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), len(sweeps), figsize=(5.5 * len(sweeps), 3.6 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, group in enumerate(sweeps):
            ax = axes[i][j]
            var = group.split("_")[1]
            sel = [r for r in rows if r["group"] == group and r["mode"] == mode and r["status"] == "ok"]
            for prov in dict.fromkeys(r["provider"] for r in sel):
                pts = sorted((r[var], r["ms_per_step"]) for r in sel if r["provider"] == prov)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(var)
            ax.set_ylabel("ms per step")
            ax.set_title(f"{mode}: time per step vs {var}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
