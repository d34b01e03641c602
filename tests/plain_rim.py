"""A deliberately plain RIM: Python loops over time, mechanisms and heads, ``torch.lstm_cell`` /
``torch.gru_cell`` (the kernels behind ``nn.LSTMCell``/``nn.GRUCell``) for the cell, and a Python
sort on ``(p, index)`` for the competition. Slow and obvious; the reference is tested against it."""

from __future__ import annotations

import math

import torch


def plain_step(sources, h, c, P, cfg, mask=None):
    """One RIM step. ``sources``: list of ``(X (B, M_s, D_s), key weight, value weight)`` whose
    elements the mechanisms attend to (with the null); ``h``, ``c``: lists of K ``(B, H)``.
    Returns new ``h``, ``c`` lists and the ``(B, K)`` mask."""
    K, n_in, dk, dv = cfg.num_units, cfg.input_heads, cfg.input_key_size, cfg.input_value_size
    n_c, dc, dcv = cfg.comm_heads, cfg.comm_key_size, cfg.comm_value_size
    lstm = cfg.cell == "lstm"
    B = h[0].shape[0]
    keys = torch.cat([X @ Wk for X, Wk, _ in sources], 1)  # (B, M_total, n*dk)
    vals = torch.cat([X @ Wv for X, _, Wv in sources], 1)
    u, p = [], []
    for k in range(K):
        q = h[k] @ P["input_query"][k]
        reads, p_null = [], 0.0
        for n in range(n_in):
            qn, kn = q[:, n * dk:(n + 1) * dk], keys[:, :, n * dk:(n + 1) * dk]
            s = (kn @ qn.unsqueeze(-1)).squeeze(-1) / math.sqrt(dk)  # (B, M)
            att = torch.softmax(torch.cat([torch.zeros_like(s[:, :1]), s], 1), 1)
            p_null = p_null + att[:, 0]
            reads.append((att[:, 1:].unsqueeze(-1) * vals[:, :, n * dv:(n + 1) * dv]).sum(1))
        u.append(torch.cat(reads, -1))
        p.append(p_null / n_in)
    p = torch.stack(p, 1).detach()
    if mask is None:
        mask = torch.zeros(B, K, dtype=torch.bool)
        for b in range(B):
            for k in sorted(range(K), key=lambda j: (p[b, j].item(), j))[:cfg.top_k]:
                mask[b, k] = True
    h_t, c_t = [], []
    for k in range(K):
        m = mask[:, k:k + 1]
        w = (P["weight_ih"][k].T, P["weight_hh"][k].T, P["bias_ih"][k], P["bias_hh"][k])
        if lstm:
            hn, cn = torch.lstm_cell(u[k], (h[k], c[k]), *w)
            c_t.append(torch.where(m, cn, c[k]))
        else:
            hn = torch.gru_cell(u[k], h[k], *w)
        h_t.append(torch.where(m, hn, h[k]))
    new_h = []
    for k in range(K):
        Q = h_t[k] @ P["comm_query"][k]
        read = []
        for n in range(n_c):
            scores, values = [], []
            for j in range(K):
                src = h_t[j]
                if cfg.block_inactive_grad:
                    src = torch.where(mask[:, j:j + 1], src, src.detach())
                kj = (src @ P["comm_key"][j])[:, n * dc:(n + 1) * dc]
                scores.append((Q[:, n * dc:(n + 1) * dc] * kj).sum(-1) / math.sqrt(dc))
                values.append((src @ P["comm_value"][j])[:, n * dcv:(n + 1) * dcv])
            b_att = torch.softmax(torch.stack(scores, 1), 1)  # (B, K)
            read.append((b_att.unsqueeze(-1) * torch.stack(values, 1)).sum(1))
        upd = torch.cat(read, -1) @ P["comm_output"][k]
        new_h.append(torch.where(mask[:, k:k + 1], h_t[k] + upd, h_t[k]))
    return new_h, (c_t if lstm else None), mask


def plain_rim(x, h0, c0, P, cfg, masks=None):
    """Same contract as ``rims_fast.rim_ref`` (no dropout): ``x (T, B, M, D)``, states ``(B, K, H)``."""
    K = cfg.num_units
    h = [h0[:, k] for k in range(K)]
    c = [c0[:, k] for k in range(K)] if c0 is not None else None
    outs, all_masks = [], []
    for t in range(x.shape[0]):
        h, c, mask = plain_step([(x[t], P["input_key"], P["input_value"])], h, c, P, cfg,
                                None if masks is None else masks[t])
        outs.append(torch.cat(h, -1))
        all_masks.append(mask)
    return (torch.stack(outs), torch.stack(h, 1), (torch.stack(c, 1) if c is not None else None),
            torch.stack(all_masks))


def plain_brim(x, states, layer_params, cfgs):
    """A BRIM stack stepped layer by layer, bottom to top; each layer sees the layer below's new
    ``h_t`` and the layer above's ``h_{t-1}``. Returns per-layer outs, final states, masks."""
    L = len(cfgs)
    h = [[s[0][:, k] for k in range(cfg.num_units)] for s, cfg in zip(states, cfgs)]
    c = [[s[1][:, k] for k in range(cfg.num_units)] if s[1] is not None else None for s, cfg in zip(states, cfgs)]
    outs, masks = [[] for _ in range(L)], [[] for _ in range(L)]
    for t in range(x.shape[0]):
        h_prev = [list(hl) for hl in h]
        for l in range(L):
            P = layer_params[l]
            below = x[t] if l == 0 else torch.cat(h[l - 1], -1).unsqueeze(1)
            sources = [(below, P["input_key_bottom_up"], P["input_value_bottom_up"])]
            if l < L - 1:
                above = torch.cat(h_prev[l + 1], -1).unsqueeze(1)
                sources.append((above, P["input_key_top_down"], P["input_value_top_down"]))
            h[l], c[l], mask = plain_step(sources, h[l], c[l], P, cfgs[l])
            outs[l].append(torch.cat(h[l], -1))
            masks[l].append(mask)
    final = [(torch.stack(h[l], 1), torch.stack(c[l], 1) if c[l] is not None else None) for l in range(L)]
    return [torch.stack(o) for o in outs], final, [torch.stack(m) for m in masks]
