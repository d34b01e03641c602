"""``NaiveRIM``: a deliberately unfused RIM, shaped like typical public RIM code.

It is the benchmark's picture of "how RIMs are usually run", not a backend: a Python loop over
steps, inside it Python loops over the ``K`` mechanisms with one small ``nn.LSTMCell``-style op
(``torch.lstm_cell``) and separate small matmuls per mechanism, the null element materialised
as a zero row concatenated to the input every step, the selection done by sorting on the host's
schedule with a ``.item()`` host sync every step, and fresh tensors created every step.

Unlike most public code it computes SPEC.md's math exactly (so it can pass the benchmark's
correctness gate against :func:`rims_fast.rim_ref`):

- the null element has key and value 0 (score 0), so ``p_k`` is the mean over heads of the
  null's softmax probability;
- the ``top_k`` smallest ``p`` are active, ties to the lower index: a *stable* sort of ``p``
  orders equal values by index, which is exactly SPEC's rule. (Public code uses ``torch.topk``,
  whose order among equal values is unspecified; at ``t = 0`` every ``p`` ties, so that would
  not conform.)
- active mechanisms step their cell, inactive ones copy ``(h, c)`` exactly;
- every mechanism offers keys/values (from ``stop_gradient(h)`` when inactive and
  ``block_inactive_grad``), active ones read with a residual.

It shares the parameters of the :class:`rims_fast.RIM` it is given (reads them at call time),
so it sees any update to them. Half-precision modules compute in float32 (as the reference
does), with ``out``, ``h_n``, ``c_n`` rounded at the end. Dropout is not implemented (the
benchmark runs with dropout 0); it raises if asked for it in training mode.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rims_fast.reference import compute_dtype

__all__ = ["NaiveRIM"]


class NaiveRIM(nn.Module):
    """Unfused RIM over a sequence with the parameters of ``rim`` (a :class:`rims_fast.RIM`).

    Call: ``out, (h_n, c_n), masks = naive(x, state=None)`` (GRU: ``out, h_n, masks``), ``x``
    ``(T, B, D)`` or ``(T, B, M, D)`` time-major; shapes as :class:`rims_fast.RIM`.
    """

    def __init__(self, rim: nn.Module):
        super().__init__()
        self.rim = rim  # a submodule: its parameters are ours

    def forward(self, x: Tensor, state=None):
        cfg = self.rim.config
        if self.training and (cfg.input_dropout > 0 or cfg.comm_dropout > 0):
            raise NotImplementedError("NaiveRIM does not implement dropout")
        if x.dim() == 3:
            x = x.unsqueeze(2)
        T, B, M, D = x.shape
        K, H, top_k = cfg.num_units, cfg.hidden_size, cfg.top_k
        n_in, d_k, d_v = cfg.input_heads, cfg.input_key_size, cfg.input_value_size
        n_c, d_c, d_cv = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
        lstm = cfg.cell == "lstm"
        dtype = x.dtype
        ct = compute_dtype(dtype)
        P = {name: p.to(ct) for name, p in self.rim.named_parameters(recurse=False)}
        x = x.to(ct)

        if state is None:
            h = [torch.zeros(B, H, dtype=ct, device=x.device) for _ in range(K)]
            c = [torch.zeros(B, H, dtype=ct, device=x.device) for _ in range(K)] if lstm else None
        else:
            h0, c0 = state if lstm else (state, None)
            h = [h0[:, k].to(ct) for k in range(K)]
            c = [c0[:, k].to(ct) for k in range(K)] if lstm else None

        outs, masks = [], []
        for t in range(T):
            # Null element: a zero row in front of the input, created every step (its key and
            # value are zero because the projections have no bias).
            null = torch.zeros(B, 1, D, dtype=ct, device=x.device)
            xs = torch.cat([null, x[t]], dim=1)  # (B, 1+M, D)
            keys = (xs @ P["input_key"]).view(B, 1 + M, n_in, d_k)
            values = (xs @ P["input_value"]).view(B, 1 + M, n_in, d_v)

            # 1. Input attention, one mechanism at a time.
            probs, reads = [], []
            for k in range(K):
                q = (h[k] @ P["input_query"][k]).view(B, n_in, d_k)
                s = torch.einsum("bnd,bmnd->bnm", q, keys) / math.sqrt(d_k)
                a = torch.softmax(s, dim=-1)  # (B, n_in, 1+M), column 0 is the null
                probs.append(a[:, :, 0].mean(-1))  # p_k: (B,)
                reads.append(torch.einsum("bnm,bmnv->bnv", a, values).reshape(B, n_in * d_v))

            # 2. Competition: the top_k smallest p, ties to the lower index (stable sort).
            p = torch.stack(probs, dim=1)  # (B, K)
            order = torch.sort(p.detach(), dim=1, stable=True).indices[:, :top_k]
            mask = torch.zeros(B, K, dtype=torch.bool, device=x.device)
            mask.scatter_(1, order, True)
            if int(mask.sum().item()) != B * top_k:  # host sync every step, as public code has
                raise AssertionError("selection lost a mechanism")

            # 3. Independent dynamics: one small cell per mechanism; inactive ones copy.
            h_tilde, c_next = [], []
            for k in range(K):
                mk = mask[:, k].unsqueeze(-1)
                if lstm:
                    hk, ck = torch.lstm_cell(reads[k], (h[k], c[k]), P["weight_ih"][k].t(),
                                             P["weight_hh"][k].t(), P["bias_ih"][k], P["bias_hh"][k])
                    c_next.append(torch.where(mk, ck, c[k]))
                else:
                    hk = torch.gru_cell(reads[k], h[k], P["weight_ih"][k].t(),
                                        P["weight_hh"][k].t(), P["bias_ih"][k], P["bias_hh"][k])
                h_tilde.append(torch.where(mk, hk, h[k]))

            # 4. Communication: every mechanism offers a key and a value; active ones read.
            ck_list, cv_list = [], []
            for j in range(K):
                hj = h_tilde[j]
                if cfg.block_inactive_grad:
                    hj = torch.where(mask[:, j].unsqueeze(-1), hj, hj.detach())
                ck_list.append((hj @ P["comm_key"][j]).view(B, n_c, d_c))
                cv_list.append((hj @ P["comm_value"][j]).view(B, n_c, d_cv))
            ckeys = torch.stack(ck_list, dim=2)  # (B, n_c, K, d_c)
            cvals = torch.stack(cv_list, dim=2)  # (B, n_c, K, d_cv)
            h_new = []
            for k in range(K):
                qk = (h_tilde[k] @ P["comm_query"][k]).view(B, n_c, 1, d_c)
                b = torch.softmax((qk @ ckeys.transpose(-1, -2)) / math.sqrt(d_c), dim=-1)
                o = (b @ cvals).reshape(B, n_c * d_cv)
                upd = h_tilde[k] + o @ P["comm_output"][k]
                h_new.append(torch.where(mask[:, k].unsqueeze(-1), upd, h_tilde[k]))

            # 5. New state.
            h = h_new
            if lstm:
                c = c_next
            outs.append(torch.cat(h, dim=-1))
            masks.append(mask)

        out = torch.stack(outs).to(dtype)
        h_n = torch.stack(h, dim=1).to(dtype)
        masks_t = torch.stack(masks)
        if lstm:
            return out, (h_n, torch.stack(c, dim=1).to(dtype)), masks_t
        return out, h_n, masks_t
