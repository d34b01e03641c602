"""``RIMCell`` and ``RIM``: drop-in ``torch.nn`` modules (SPEC.md, "Module API")."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _backend
from ._config import BACKENDS, RimConfig

State = Union[Tensor, tuple[Tensor, Tensor], None]


class _RimLayer(nn.Module):
    """Parameters, initialisation, input checks and backend dispatch shared by RIM and RIMCell."""

    def __init__(self, input_size: int, hidden_size: int, num_units: int, top_k: int, *,
                 cell: str = "lstm", input_heads: int = 1, input_key_size: int = 64,
                 input_value_size: Optional[int] = None, comm_heads: int = 4,
                 comm_key_size: int = 32, comm_value_size: int = 32, input_dropout: float = 0.0,
                 comm_dropout: float = 0.0, block_inactive_grad: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.config = RimConfig(
            input_size, hidden_size, num_units, top_k, cell=cell, input_heads=input_heads,
            input_key_size=input_key_size, input_value_size=input_value_size,
            comm_heads=comm_heads, comm_key_size=comm_key_size, comm_value_size=comm_value_size,
            input_dropout=input_dropout, comm_dropout=comm_dropout,
            block_inactive_grad=block_inactive_grad)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_factory_dtype(dtype)
        self.backend = backend
        #: Name of the backend that ran the last forward (``None`` before the first call).
        self.last_backend: Optional[str] = None
        factory = {"device": device, "dtype": dtype}
        for name, shape in self.config.param_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    # Read-only views of the config under nn-style names.
    input_size = property(lambda self: self.config.input_size)
    hidden_size = property(lambda self: self.config.hidden_size)
    num_units = property(lambda self: self.config.num_units)
    top_k = property(lambda self: self.config.top_k)
    cell = property(lambda self: self.config.cell)

    def reset_parameters(self) -> None:
        """Re-draw every parameter: ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` from
        ``U(-1/sqrt(H), 1/sqrt(H))`` as ``nn.LSTMCell``; every other projection from
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = shape[-2]``."""
        with torch.no_grad():
            for name, p in self.named_parameters(recurse=False):
                bound = self.config.init_bound(name)
                p.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        # As nn.LSTM: the sizes, then only the keyword arguments that differ from their defaults.
        c = self.config
        args = [f"{c.input_size}, {c.hidden_size}, num_units={c.num_units}, top_k={c.top_k}"]
        args += [f"{k}={v!r}" for k, v in config_kwargs(c).items() if v != CONFIG_DEFAULTS[k]]
        if getattr(self, "batch_first", False):  # RIM only; RIMCell has no batch_first
            args.append("batch_first=True")
        if self.backend != "auto":
            args.append(f"backend={self.backend!r}")
        return ", ".join(args)

    def _check_input(self, x: Tensor, ranks: tuple[int, int], layout: str) -> None:
        check_input(x, ranks, self.config.input_size, self.input_key, layout)

    def _check_state(self, state: State, x: Tensor, B: int) -> tuple[Tensor, Optional[Tensor]]:
        c = self.config
        return check_state(state, x, (B, c.num_units, c.hidden_size), c.cell == "lstm")

    def _run(self, x: Tensor, state: State):
        """``x``: ``(T, B, M, D)`` -> ``out, h_n, c_n, masks`` from the resolved backend."""
        h0, c0 = self._check_state(state, x, x.shape[1])
        name = _backend.resolve(self.backend, x.device, x.dtype)
        params = dict(self.named_parameters(recurse=False))
        with _backend.no_autocast(x.device.type):
            result = _backend.runner(name)(x, h0, c0, params, self.config, training=self.training)
        self.last_backend = name  # only once it ran: after a failure it still names the last success
        return result


class RIM(_RimLayer):
    r"""Recurrent Independent Mechanisms over a sequence: a drop-in for ``nn.LSTM``/``nn.GRU``.

    ``K = num_units`` small LSTMs (or GRUs) of ``hidden_size`` each compete through input
    attention; the ``top_k`` that attend least to a null element update, the others copy their
    state; active mechanisms then read from all through multi-head attention. SPEC.md is the
    contract.

    Args:
        input_size: ``D``, features per input element.
        hidden_size: ``H``, hidden size of each mechanism (the output has ``K*H`` features).
        num_units: ``K``, number of mechanisms.
        top_k: active mechanisms per sample and step, ``1 <= top_k <= num_units``.
        cell: ``"lstm"`` or ``"gru"``.
        input_heads: heads of the input attention.
        input_key_size: key/query size per input-attention head.
        input_value_size: value size per input-attention head; ``None`` means
            ``4 * hidden_size // input_heads``.
        comm_heads: heads of the communication attention.
        comm_key_size: key/query size per communication head.
        comm_value_size: value size per communication head.
        input_dropout: dropout probability on input-attention probabilities (training only).
        comm_dropout: dropout probability on communication-attention probabilities.
        block_inactive_grad: stop the gradient into inactive mechanisms' state through the
            communication keys and values (their projections still get gradient).
        batch_first: ``x``, ``out`` and masks are ``(B, T, ...)`` instead of ``(T, B, ...)``.
            States are always ``(B, K, H)``.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpu"``; see README.
            After a call, ``last_backend`` names the one that ran.
        device, dtype: factory arguments of the parameters.

    Call: ``out, (h_n, c_n) = rim(x, state=None)`` (GRU: ``out, h_n``); with
    ``return_masks=True`` a third value, the ``(T, B, K)`` bool mask of active mechanisms.
    ``x`` is ``(T, B, D)`` or ``(T, B, M, D)`` (``M`` input elements per step).
    """

    def __init__(self, input_size: int, hidden_size: int, num_units: int, top_k: int, *,
                 batch_first: bool = False, **kwargs):
        check_kwargs("RIM", kwargs)
        super().__init__(input_size, hidden_size, num_units, top_k, **kwargs)
        self.batch_first = check_bool("batch_first", batch_first)

    def forward(self, x: Tensor, state: State = None, return_masks: bool = False):
        self._check_input(x, (3, 4), "BTMD" if self.batch_first else "TBMD")
        if self.batch_first:
            x = x.transpose(0, 1)
        if x.dim() == 3:
            x = x.unsqueeze(2)  # M = 1
        out, h_n, c_n, masks = self._run(x, state)
        if self.batch_first:
            out, masks = out.transpose(0, 1), masks.transpose(0, 1)
        new_state = (h_n, c_n) if self.config.cell == "lstm" else h_n
        return (out, new_state, masks) if return_masks else (out, new_state)


class RIMCell(_RimLayer):
    r"""One RIM step: ``(h, c), mask = cell(x_t, (h, c))`` (GRU: ``h, mask = cell(x_t, h)``).

    Same arguments and parameters as :class:`RIM` (without ``batch_first``). ``x_t`` is
    ``(B, D)`` or ``(B, M, D)``; the state is ``(B, K, H)`` (zeros when ``None``); ``mask`` is
    ``(B, K)`` bool. Stepping a ``RIMCell`` T times equals one ``RIM`` call in float32/float64.
    """

    def __init__(self, input_size: int, hidden_size: int, num_units: int, top_k: int, **kwargs):
        check_kwargs("RIMCell", kwargs)
        super().__init__(input_size, hidden_size, num_units, top_k, **kwargs)

    def forward(self, x: Tensor, state: State = None):
        self._check_input(x, (2, 3), "BMD")
        if x.dim() == 2:
            x = x.unsqueeze(1)
        _, h_n, c_n, masks = self._run(x.unsqueeze(0), state)
        new_state = (h_n, c_n) if self.config.cell == "lstm" else h_n
        return new_state, masks[0]


# -- reprs (shared with BRIM) ----------------------------------------------------------------------
#: RimConfig's keyword fields (everything after ``top_k``, in the constructors' order) and defaults.
CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RimConfig)
                   if f.default is not dataclasses.MISSING}


def config_kwargs(cfg: RimConfig) -> dict:
    """``cfg``'s keyword fields as a constructor would take them: ``input_value_size`` is ``None``
    when it is the value ``None`` derives (``4 * hidden_size // input_heads``), so that the repr
    does not show it as a choice; dropouts are plain floats (a NumPy float's repr names its
    type)."""
    kw = {name: getattr(cfg, name) for name in CONFIG_DEFAULTS}
    H, n_in = cfg.hidden_size, cfg.input_heads
    if (4 * H) % n_in == 0 and kw["input_value_size"] == 4 * H // n_in:
        kw["input_value_size"] = None
    for name in ("input_dropout", "comm_dropout"):
        kw[name] = float(kw[name])
    return kw


# -- construction checks beyond RimConfig's (shared with BRIM) -------------------------------------
#: Keyword arguments of ``_RimLayer`` (everything after ``top_k``), for :func:`check_kwargs`.
_LAYER_KWARGS = frozenset(
    n for n, p in inspect.signature(_RimLayer.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_kwargs(cls: str, kwargs: dict) -> None:
    """Report an unknown keyword against the public class, not the private ``_RimLayer``."""
    unknown = sorted(set(kwargs) - _LAYER_KWARGS)
    if unknown:
        raise TypeError(f"{cls}.__init__() got an unexpected keyword argument {unknown[0]!r}")


def check_bool(name: str, v) -> bool:
    """``v`` itself if it is a bool; ``bool("False")`` would silently be True."""
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r}")
    return v


def check_factory_dtype(dtype) -> None:
    """The parameters' ``dtype=``: None or a floating dtype (else torch fails later with a message
    about ``requires_grad`` that does not name ``dtype``)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating dtype (or None), got {dtype}")


# -- call-time checks (SPEC "Errors": floating dtype, rank, sizes, then agreement) -----------------
def check_input(x: Tensor, ranks: tuple[int, int], input_size: int, param: Tensor,
                layout: str = "TBMD") -> None:
    """``x`` must be a floating tensor of rank in ``ranks``, last dim ``input_size``, every size
    >= 1, with ``param``'s dtype and device. ``layout`` names the dims of the higher rank (the
    lower one has no ``M``), for the message about a zero size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype, got {x.dtype}")
    if x.dim() not in ranks:
        dims = " or ".join(str(r) for r in sorted(set(ranks)))
        raise ValueError(f"x must have dim {dims}, got dim {x.dim()} (shape {tuple(x.shape)})")
    if x.shape[-1] != input_size:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected last dim input_size={input_size}")
    if any(n < 1 for n in x.shape):
        _zero_size(x, layout if x.dim() == len(layout) else layout.replace("M", ""))
    if x.dtype != param.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the parameters have dtype {param.dtype}")
    if x.device != param.device:
        raise ValueError(f"x is on {x.device} but the parameters are on {param.device}")


def _zero_size(x: Tensor, letters: str) -> None:
    """Raise for a zero T, B or M (``letters`` name ``x``'s dims; the last is D, checked before)."""
    dims = letters[:-1]
    names = f"{', '.join(dims[:-1])} and {dims[-1]}" if len(dims) > 1 else dims
    zeros = ", ".join(f"{l}={n}" for l, n in zip(letters, x.shape) if n < 1)
    raise ValueError(f"x has shape {tuple(x.shape)}: {names} must be >= 1 (got {zeros})")


def check_state(state: State, x: Tensor, expected: tuple[int, int, int], lstm: bool,
                where: str = "") -> tuple[Tensor, Optional[Tensor]]:
    """``(h0, c0)`` of shape ``expected`` = ``(B, K, H)`` (``c0`` None for GRU); zeros when
    ``state`` is None. ``where`` prefixes names in messages (e.g. ``"states[1]."`` for BRIM)."""
    if state is None:
        return x.new_zeros(expected), (x.new_zeros(expected) if lstm else None)
    whole = where.rstrip(".") or "state"  # the state itself: "states[1]", not "states[1]."
    if lstm:
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise TypeError(f"{whole} must be a tuple (h_0, c_0) for cell='lstm'")
        named = {"h_0": state[0], "c_0": state[1]}
    else:
        if not isinstance(state, Tensor):
            raise TypeError(f"{whole} must be a Tensor h_0 for cell='gru'")
        named = {"h_0": state}
    for name, t in named.items():
        name = where + name
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have dim 3 (B, K, H), got dim {t.dim()}")
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected shape {expected}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return named["h_0"], named.get("c_0")


def check_masks(masks: Optional[Tensor], x: Tensor, expected: tuple[int, int, int],
                name: str = "masks") -> None:
    """Imposed selections (the reference's ``masks=``): ``None`` or a bool tensor of shape
    ``expected`` = ``(T, B, K)`` on ``x``'s device. The count of true per row is not checked: that
    would be a device sync per call."""
    if masks is None:
        return
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool:
        got = masks.dtype if isinstance(masks, Tensor) else type(masks).__name__
        raise TypeError(f"{name} must be a bool Tensor (T, B, K), got {got}")
    if tuple(masks.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(masks.shape)}, expected shape (T, B, K) = "
                         f"{expected}")
    if masks.device != x.device:
        raise ValueError(f"{name} is on {masks.device} but x is on {x.device}")
