"""Validated hyper-parameters of one RIM layer (SPEC.md, "Module API" and "Errors")."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
CELLS = {"lstm": 4, "gru": 3}  # cell name -> number of gate blocks G


@dataclass(frozen=True)
class RimConfig:
    """Sizes and options of a RIM layer. All attention sizes are per head.

    Letters (SPEC.md): ``D`` input size, ``K`` mechanisms, ``H`` hidden per mechanism,
    ``n_in``/``d_k``/``d_v`` input-attention heads and key/value sizes, ``n_c``/``d_c``/``d_cv``
    communication heads and key/value sizes.
    """

    input_size: int
    hidden_size: int
    num_units: int
    top_k: int
    cell: str = "lstm"
    input_heads: int = 1
    input_key_size: int = 64
    input_value_size: int | None = None
    comm_heads: int = 4
    comm_key_size: int = 32
    comm_value_size: int = 32
    input_dropout: float = 0.0
    comm_dropout: float = 0.0
    block_inactive_grad: bool = True

    def __post_init__(self):
        # Order follows SPEC.md: sizes and counts first, then top_k, dropout, cell, divisibility.
        # Integer-like values (NumPy, 0-dim torch ints) are stored as Python ints: the sizes go
        # into custom-op schemas and cache keys, which want plain ints.
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if v is None and name == "input_value_size":  # None: derived below
                continue
            _check_positive_int(name, v)
            object.__setattr__(self, name, _as_int(v))
        top_k = _as_int(self.top_k)
        if top_k is None or not 1 <= top_k <= self.num_units:
            raise ValueError(f"top_k must be an int in 1..num_units={self.num_units}, got {self.top_k!r}")
        object.__setattr__(self, "top_k", top_k)
        for name in ("input_dropout", "comm_dropout"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
        if not isinstance(self.cell, str) or self.cell not in CELLS:  # a list is unhashable
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.input_value_size is None:
            if (4 * self.hidden_size) % self.input_heads:
                raise ValueError(
                    f"input_value_size=None means 4*hidden_size // input_heads, but 4*hidden_size="
                    f"{4 * self.hidden_size} is not divisible by input_heads={self.input_heads}; "
                    "pass input_value_size explicitly")
            object.__setattr__(self, "input_value_size", 4 * self.hidden_size // self.input_heads)
        if not isinstance(self.block_inactive_grad, bool):
            raise ValueError(f"block_inactive_grad must be a bool, got {self.block_inactive_grad!r}")

    @property
    def gates(self) -> int:
        """G: gate blocks of the cell (4 for LSTM, 3 for GRU)."""
        return CELLS[self.cell]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, exactly SPEC.md's table."""
        D, H, K = self.input_size, self.hidden_size, self.num_units
        nk = self.input_heads * self.input_key_size
        nv = self.input_heads * self.input_value_size
        ck = self.comm_heads * self.comm_key_size
        cv = self.comm_heads * self.comm_value_size
        GH = self.gates * H
        return {
            "input_key": (D, nk),
            "input_value": (D, nv),
            "input_query": (K, H, nk),
            "weight_ih": (K, nv, GH),
            "weight_hh": (K, H, GH),
            "bias_ih": (K, GH),
            "bias_hh": (K, GH),
            "comm_query": (K, H, ck),
            "comm_key": (K, H, ck),
            "comm_value": (K, H, cv),
            "comm_output": (K, cv, H),
        }

    def init_bound(self, name: str) -> float:
        """Bound b of the U(-b, b) initialisation of parameter ``name`` (SPEC.md)."""
        if name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            return 1.0 / math.sqrt(self.hidden_size)  # as nn.LSTMCell / nn.GRUCell
        return 1.0 / math.sqrt(self.param_shapes()[name][-2])  # fan_in = shape[-2]


_INT_FIELDS = ("input_size", "hidden_size", "num_units", "input_heads", "input_key_size",
               "comm_heads", "comm_key_size", "comm_value_size", "input_value_size")


def _as_int(v):
    """``v`` as a Python int if it is an integer (anything with ``__index__``: int, NumPy and
    0-dim torch integers) but not a bool, else ``None``."""
    if isinstance(v, bool):  # True would pass as 1
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _check_positive_int(name: str, v) -> None:
    n = _as_int(v)
    if n is None or n < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def cfg_args(cfg: RimConfig) -> tuple[list[int], str, float, float, bool]:
    """A config as custom-op arguments: sizes, cell, dropouts, block_inactive_grad."""
    sizes = [cfg.input_size, cfg.hidden_size, cfg.num_units, cfg.top_k, cfg.input_heads,
             cfg.input_key_size, cfg.input_value_size, cfg.comm_heads, cfg.comm_key_size,
             cfg.comm_value_size]
    return sizes, cfg.cell, float(cfg.input_dropout), float(cfg.comm_dropout), cfg.block_inactive_grad


def cfg_from(sizes: Sequence[int], cell: str, input_dropout: float, comm_dropout: float,
             block_inactive_grad: bool) -> RimConfig:
    """The inverse of :func:`cfg_args`."""
    D, H, K, top_k, n_in, d_k, d_v, n_c, d_c, d_cv = (int(s) for s in sizes)
    return RimConfig(D, H, K, top_k, cell=cell, input_heads=n_in, input_key_size=d_k,
                     input_value_size=d_v, comm_heads=n_c, comm_key_size=d_c, comm_value_size=d_cv,
                     input_dropout=input_dropout, comm_dropout=comm_dropout,
                     block_inactive_grad=block_inactive_grad)
