"""``BRIM``: stacked RIM layers with bottom-up and top-down attention (Mittal et al., ICML 2020).

SPEC.md "Multi-layer: BRIM" is the contract; :func:`rims_fast.reference.brim_ref` computes it.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _backend
from ._config import BACKENDS, RimConfig, _as_int
from .modules import (CONFIG_DEFAULTS, check_bool, check_factory_dtype, check_input, check_state,
                      config_kwargs)
from .reference import brim_ref
from .rim_seq import cuda_fwd_mode

PerLayer = Union[int, Sequence[int], None]

#: Backends that run a BRIM stack: the reference, the CUDA ops per layer-step (or the reference
#: with the fused CUDA cell under RIMS_FAST_CUDA_FWD=cell), the C++
#: driver one layer-step per call (:mod:`rims_fast.brim_cpu`) and the Triton RIM kernels one
#: layer-step at a time (:mod:`rims_fast.brim_triton`).
BRIM_BACKENDS = ("torch", "cuda", "cpu", "triton")
#: ``backend="auto"`` tries these in order for the tensors' device type. Defined in
#: :mod:`rims_fast._backend` beside RIM's order (the reasons are there), so that one resolver
#: serves and logs both.
BRIM_AUTO_ORDER = _backend.BRIM_AUTO_ORDER


class BrimLayer(nn.Module):
    """Parameters of one BRIM layer: the RIM parameters (SPEC table) with the input key/value
    pair split into ``*_bottom_up`` (width ``cfg.input_size``) and, below the top layer,
    ``*_top_down`` (width ``top_down_size`` = the layer above's ``K*H``)."""

    def __init__(self, cfg: RimConfig, top_down_size: Optional[int], device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.top_down_size = top_down_size
        shapes = {}
        for name, shape in cfg.param_shapes().items():
            if name in ("input_key", "input_value"):
                shapes[f"{name}_bottom_up"] = shape
                if top_down_size is not None:
                    shapes[f"{name}_top_down"] = (top_down_size, shape[1])
            else:
                shapes[name] = shape
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As :meth:`rims_fast.RIM.reset_parameters`; the per-source pairs use ``fan_in = shape[-2]``."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                base = name.replace("_bottom_up", "").replace("_top_down", "")
                bound = self.config.init_bound(base) if base == name else p.shape[-2] ** -0.5
                p.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        # The layer's sizes; the options BRIM shares across layers are on BRIM's own line.
        c = self.config
        args = [f"{c.input_size}, {c.hidden_size}, num_units={c.num_units}, top_k={c.top_k}"]
        args += [f"{k}={v!r}" for k, v in config_kwargs(c).items()
                 if k not in _SHARED and v != CONFIG_DEFAULTS[k]]
        if self.top_down_size is not None:
            args.append(f"top_down_size={self.top_down_size}")
        return ", ".join(args)


class BRIM(nn.Module):
    r"""A stack of ``L`` RIM layers; layer ``l`` attends to the layer below (this step) and the
    layer above (previous step).

    Args:
        input_size: ``D`` of the bottom layer's input elements.
        hidden_sizes: ``H_l`` per layer (an int for all layers, or a list).
        num_units: ``K_l`` per layer (int or list).
        top_k: active mechanisms per layer (int or list), ``1 <= top_k_l <= K_l``.
        num_layers: ``L``; ``None`` infers it from the list arguments (all lists must agree),
            or 1 when every per-layer argument is an int.
        cell, input_dropout, comm_dropout, block_inactive_grad: as :class:`rims_fast.RIM`, shared
            by all layers.
        input_heads, input_key_size, input_value_size, comm_heads, comm_key_size,
            comm_value_size: as :class:`rims_fast.RIM`, an int (or None) for all layers or a list.
        batch_first: ``x``, ``out`` and masks are ``(B, T, ...)``; states stay ``(B, K, H)``.
        output_all_layers: return every layer's ``h_t`` concatenated on the last dim (bottom to
            top) instead of the top layer's.
        backend: ``"auto"``, ``"torch"`` (the reference), ``"cuda"`` (per layer the persistent
            kernels, one launch per layer-step, or the stepped ops, as
            :func:`rims_fast.rim_seq.use_stepped` picks, see :mod:`rims_fast.brim_seq`; with
            ``RIMS_FAST_CUDA_FWD=cell`` the reference with the fused CUDA cell) or ``"cpu"`` (the C++ driver, one fused layer-step per call; see
            :mod:`rims_fast.brim_cpu`) or ``"triton"`` (the Triton RIM kernels per layer-step,
            backward by recompute; see :mod:`rims_fast.brim_triton`). ``"auto"`` picks the first
            available of ``"cpu"``, ``"torch"`` on CPU tensors and of ``"cuda"``, ``"triton"``,
            ``"torch"`` on CUDA tensors (:data:`BRIM_AUTO_ORDER`), and logs its choice once per
            device/dtype on the ``rims_fast`` logger.
        device, dtype: factory arguments of the parameters.

    Call: ``out, states = brim(x, states=None)`` with ``states`` a list of per-layer ``(h, c)``
    (GRU: ``h``); ``return_masks=True`` adds a list of per-layer ``(T, B, K_l)`` masks.
    """

    def __init__(self, input_size: int, hidden_sizes: PerLayer, num_units: PerLayer,
                 top_k: PerLayer, *, num_layers: Optional[int] = None, cell: str = "lstm",
                 input_heads: PerLayer = 1, input_key_size: PerLayer = 64,
                 input_value_size: PerLayer = None, comm_heads: PerLayer = 4,
                 comm_key_size: PerLayer = 32, comm_value_size: PerLayer = 32,
                 input_dropout: float = 0.0, comm_dropout: float = 0.0,
                 block_inactive_grad: bool = True, batch_first: bool = False,
                 output_all_layers: bool = False, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        per_layer = dict(hidden_size=hidden_sizes, num_units=num_units, top_k=top_k,
                         input_heads=input_heads, input_key_size=input_key_size,
                         input_value_size=input_value_size, comm_heads=comm_heads,
                         comm_key_size=comm_key_size, comm_value_size=comm_value_size)
        L = _num_layers(per_layer, num_layers)
        args = [{k: (v[l] if isinstance(v, (list, tuple)) else v) for k, v in per_layer.items()}
                for l in range(L)]
        cfgs, width = [], input_size
        for l, a in enumerate(args):
            cfg = _layer_config(l, a, width, cell=cell, input_dropout=input_dropout,
                                comm_dropout=comm_dropout, block_inactive_grad=block_inactive_grad)
            cfgs.append(cfg)
            width = cfg.num_units * cfg.hidden_size
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_factory_dtype(dtype)
        self.backend = backend
        self.batch_first = check_bool("batch_first", batch_first)
        self.output_all_layers = check_bool("output_all_layers", output_all_layers)
        self.last_backend: Optional[str] = None
        tops = [c.num_units * c.hidden_size for c in cfgs[1:]] + [None]
        self.layers = nn.ModuleList(BrimLayer(c, td, device=device, dtype=dtype)
                                    for c, td in zip(cfgs, tops))

    @property
    def configs(self) -> list[RimConfig]:
        return [layer.config for layer in self.layers]

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def extra_repr(self) -> str:
        # The constructor's arguments, non-defaults only: a per-layer argument prints as one value
        # when all layers agree, else as the list; num_layers only when no list gives it.
        cfgs = self.configs
        kws = [config_kwargs(c) for c in cfgs]
        per_layer = {"hidden_sizes": [c.hidden_size for c in cfgs],
                     "num_units": [c.num_units for c in cfgs], "top_k": [c.top_k for c in cfgs]}
        per_layer.update((k, [kw[k] for kw in kws]) for k in CONFIG_DEFAULTS
                         if any(kw[k] != CONFIG_DEFAULTS[k] for kw in kws))
        shown = {k: v[0] if all(x == v[0] for x in v) else v for k, v in per_layer.items()}
        has_list = any(isinstance(v, list) for v in shown.values())
        args = [f"{cfgs[0].input_size}, {shown.pop('hidden_sizes')!r}"]
        args += [f"{k}={shown.pop(k)!r}" for k in ("num_units", "top_k")]
        if len(cfgs) > 1 and not has_list:
            args.append(f"num_layers={len(cfgs)}")
        args += [f"{k}={v!r}" for k, v in shown.items()]
        for name in ("batch_first", "output_all_layers"):
            if getattr(self, name):
                args.append(f"{name}=True")
        if self.backend != "auto":
            args.append(f"backend={self.backend!r}")
        return ", ".join(args)

    def forward(self, x: Tensor, states: Optional[Sequence] = None, return_masks: bool = False):
        cfgs = self.configs
        check_input(x, (3, 4), cfgs[0].input_size, self.layers[0].input_key_bottom_up,
                    "BTMD" if self.batch_first else "TBMD")
        if self.batch_first:
            x = x.transpose(0, 1)
        if x.dim() == 3:
            x = x.unsqueeze(2)
        B, lstm = x.shape[1], cfgs[0].cell == "lstm"
        if states is not None and (not isinstance(states, (list, tuple)) or len(states) != len(cfgs)):
            raise TypeError(f"states must be a list of {len(cfgs)} per-layer states (or None)")
        checked = [check_state(None if states is None else states[l], x,
                               (B, c.num_units, c.hidden_size), lstm, where=f"states[{l}].")
                   for l, c in enumerate(cfgs)]
        name = self._resolve(x)
        run = brim_ref
        if name == "cpu":
            from .brim_cpu import brim_cpu
            run = brim_cpu
        elif name == "triton":
            from .brim_triton import brim_triton
            run = brim_triton
        elif name == "cuda" and cuda_fwd_mode() != "cell":  # auto, persistent or stepped
            from .brim_seq import brim_seq
            run = brim_seq
        elif name == "cuda":
            from .masked_cell import masked_gru_cell, masked_lstm_cell
            run = functools.partial(brim_ref, lstm_cell=masked_lstm_cell, gru_cell=masked_gru_cell)
        params = [dict(layer.named_parameters()) for layer in self.layers]
        with _backend.no_autocast(x.device.type):  # SPEC's dtype contract, as RIM
            outs, final, masks = run(x, checked, params, cfgs, training=self.training)
        self.last_backend = name  # only once it ran, as RIM
        out = torch.cat(outs, -1) if self.output_all_layers else outs[-1]
        if self.batch_first:
            out, masks = out.transpose(0, 1), [m.transpose(0, 1) for m in masks]
        new_states = [(h, c) if lstm else h for h, c in final]
        return (out, new_states, masks) if return_masks else (out, new_states)

    def _resolve(self, x: Tensor) -> str:
        if self.backend in BACKENDS and self.backend not in ("auto", *BRIM_BACKENDS):
            raise RuntimeError(f"backend={self.backend!r} does not run BRIM stacks in this version; "
                               f"use one of {BRIM_BACKENDS} or 'auto'")
        # RIM's resolver, with BRIM's auto order; it logs the auto choice once per device/dtype.
        return _backend.resolve(self.backend, x.device, x.dtype, "BRIM")


#: BRIM arguments that are one value for all layers (the rest may differ per layer).
_SHARED = ("cell", "input_dropout", "comm_dropout", "block_inactive_grad")
#: Per-layer keys whose BRIM argument has another name (RimConfig's ``hidden_size``).
_ARG_NAMES = {"hidden_size": "hidden_sizes"}


def _layer_config(l: int, args: dict, width: int, **shared) -> RimConfig:
    """Layer ``l``'s config; errors in a per-layer argument say which layer and name BRIM's
    argument (arguments in ``shared`` are one value for all layers: no layer to name)."""
    try:
        return RimConfig(width, **shared, **args)
    except ValueError as e:
        msg = str(e)
        if any(msg.startswith(f"{k} ") for k in shared):
            if isinstance(shared.get("cell"), (list, tuple)) and msg.startswith("cell "):
                msg += " (one cell for all layers)"
            raise ValueError(msg) from None
        for key, arg in _ARG_NAMES.items():
            if msg.startswith(f"{key} "):
                msg = arg + msg[len(key):]
        raise ValueError(f"layer {l}: {msg}") from None


def _num_layers(per_layer: dict, num_layers: Optional[int]) -> int:
    lengths = {k: len(v) for k, v in per_layer.items() if isinstance(v, (list, tuple))}
    if num_layers is not None:
        n = _as_int(num_layers)
        if n is None or n < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        num_layers = n
    L = num_layers if num_layers is not None else next(iter(lengths.values()), 1)
    if L < 1:
        raise ValueError("a BRIM needs at least one layer (got empty per-layer lists)")
    for k, n in lengths.items():
        if n != L:
            raise ValueError(f"{_ARG_NAMES.get(k, k)} has {n} entries but the stack has {L} layers")
    return L
