"""Benchmark shapes. One :class:`BenchConfig` per timed shape; sweeps expand to several.

Letters as in SPEC.md: ``B`` batch, ``T`` steps, ``D`` input size, ``K`` mechanisms, ``top_k``
active mechanisms, ``H`` hidden size per mechanism, ``M`` input elements per step. Every other
RIM argument is the module default (1 input head of key size 64 and value size ``4H``; 4
communication heads of key and value size 32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["BenchConfig", "CONFIGS", "SWEEPS", "expand", "default_config_names"]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    B: int
    T: int
    D: int
    K: int
    top_k: int
    H: int
    M: int = 1
    group: str = ""  # the sweep a config belongs to ("" for a named config)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.B, self.T, self.M, self.D, self.K, self.top_k, self.H)

    def describe(self) -> str:
        m = f" M={self.M}" if self.M != 1 else ""
        return f"B={self.B} T={self.T} D={self.D} K={self.K} top_k={self.top_k} H={self.H}{m}"

    def as_dict(self) -> dict:
        return asdict(self)


#: The RIMs paper's sequential-MNIST-style layer (Goyal et al.): 6 mechanisms of 100, 4 active.
PAPER = BenchConfig("paper", B=64, T=100, D=64, K=6, top_k=4, H=100)

CONFIGS: dict[str, BenchConfig] = {
    "paper": PAPER,
    # The issue-2 CPU target: `paper` with T halved, named so that nobody mistakes it for `paper`.
    "paper_T50": replace(PAPER, name="paper_T50", T=50),
    "large": BenchConfig("large", B=256, T=512, D=512, K=8, top_k=4, H=256),
    # One step of one sample through the paper layer: an RL policy's rollout step (RIMCell's use).
    "rl_step": replace(PAPER, name="rl_step", B=1, T=1),
    "smoke": BenchConfig("smoke", B=4, T=8, D=16, K=4, top_k=2, H=16),
}


def _sweep(var: str, values, **fixed) -> list[BenchConfig]:
    out = []
    for v in values:
        kw = {var: v}
        if var == "K":  # keep about two thirds of the mechanisms active, as in `paper` (4 of 6)
            kw["top_k"] = max(1, round(2 * v / 3))
        out.append(replace(PAPER, name=f"sweep_{var}:{var}={v}", group=f"sweep_{var}", **kw, **fixed))
    return out


#: Sweeps around `paper`, one variable at a time.
SWEEPS: dict[str, list[BenchConfig]] = {
    "sweep_T": _sweep("T", (10, 25, 50, 100, 200)),
    "sweep_B": _sweep("B", (1, 16, 64, 256)),
    "sweep_K": _sweep("K", (4, 6, 8, 12, 16)),
    "sweep_H": _sweep("H", (32, 64, 100, 200, 400)),
}


def default_config_names(device_type: str, smoke: bool) -> list[str]:
    if smoke:
        return ["smoke"]
    if device_type == "cuda":
        return ["paper", "large", "rl_step", "sweep_T", "sweep_B", "sweep_K", "sweep_H"]
    # CPU: a few minutes on 2 cores, so the sweeps stop at `paper`'s T and B (T=200 and B=256
    # run when named); `large` is GPU-only by default (seconds per call here).
    return ["paper_T50", "paper", "rl_step", "sweep_T:T=10", "sweep_T:T=25", "sweep_T:T=50", "sweep_T:T=100",
            "sweep_B:B=1", "sweep_B:B=16", "sweep_B:B=64"]


def expand(names: list[str]) -> list[BenchConfig]:
    """Config and sweep names -> configs, in order, without duplicates. ``sweep_T:T=50`` picks
    one point of a sweep."""
    out: list[BenchConfig] = []
    points = {c.name: c for s in SWEEPS.values() for c in s}
    for name in names:
        if name in CONFIGS:
            new = [CONFIGS[name]]
        elif name in SWEEPS:
            new = SWEEPS[name]
        elif name in points:
            new = [points[name]]
        else:
            known = sorted(CONFIGS) + sorted(SWEEPS)
            raise SystemExit(f"rims-bench: unknown config {name!r}; known: {', '.join(known)} "
                             "(or one sweep point such as sweep_T:T=50)")
        out.extend(c for c in new if c not in out)
    return out
