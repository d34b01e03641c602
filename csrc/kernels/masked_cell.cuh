// Torch-free pointwise math of the masked LSTM / GRU cell update, shared by the CUDA kernels,
// the C++ CPU op and the host tests (csrc/tests), so every backend runs the same formulas.
//
// Forward formulas are those of nn.LSTMCell / nn.GRUCell (ATen's RNN.cpp), written in the same
// order of operations. Inactive rows are copied, never recomputed, so they are bit-exact.
#pragma once

#include <cmath>
#include <cstdint>

#include "rims_params.h"

#if defined(__CUDACC__)
#define RIMS_HD __host__ __device__ __forceinline__
#else
#define RIMS_HD inline
#endif

namespace rims {

// Overloads instead of std:: calls: expf/tanhf and exp/tanh exist on host and device alike.
RIMS_HD float rims_exp(float x) { return expf(x); }
RIMS_HD double rims_exp(double x) { return exp(x); }
RIMS_HD float rims_tanh(float x) { return tanhf(x); }
RIMS_HD double rims_tanh(double x) { return tanh(x); }

// exp of a non-positive argument only: no overflow, and small results keep full relative
// precision (1 / (1 + exp(-x)) loses it for x << 0).
template <typename T>
RIMS_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + rims_exp(-x));
  const T e = rims_exp(x);
  return e / (T(1) + e);
}

// ---- LSTM: gate pre-activations i, f, g, o (PyTorch order), previous cell c. ----
template <typename T>
RIMS_HD void lstm_pointwise_fwd(T i, T f, T g, T o, T c, T& h_new, T& c_new) {
  c_new = sigmoid(f) * c + sigmoid(i) * rims_tanh(g);
  h_new = sigmoid(o) * rims_tanh(c_new);
}

// Activations are recomputed from the pre-activations instead of being saved: the op is
// memory bound, and recomputing costs less than writing and reading 4H more values per row.
template <typename T>
RIMS_HD void lstm_pointwise_bwd(T dh, T dc, T i, T f, T g, T o, T c,
                                T& di, T& df, T& dg, T& do_, T& dc_prev) {
  const T si = sigmoid(i), sf = sigmoid(f), tg = rims_tanh(g), so = sigmoid(o);
  const T c_new = sf * c + si * tg;
  const T tc = rims_tanh(c_new);
  const T dcn = dc + dh * so * (T(1) - tc * tc);  // total gradient reaching c_new
  do_ = dh * tc * so * (T(1) - so);
  di = dcn * tg * si * (T(1) - si);
  df = dcn * c * sf * (T(1) - sf);
  dg = dcn * si * (T(1) - tg * tg);
  dc_prev = dcn * sf;
}

// ---- GRU: input terms (ir, iz, in) incl. bias_ih, recurrent terms (hr, hz, hn) incl. bias_hh.
template <typename T>
RIMS_HD T gru_pointwise_fwd(T ir, T iz, T in, T hr, T hz, T hn, T h) {
  const T r = sigmoid(ir + hr);
  const T z = sigmoid(iz + hz);
  const T n = rims_tanh(in + r * hn);
  return n + z * (h - n);  // = (1 - z) n + z h, in ATen's order of operations
}

// dh_prev is only the direct term z * dh: h's path through hn (the recurrent matmul) is
// propagated by the caller from the returned d_hn.
template <typename T>
RIMS_HD void gru_pointwise_bwd(T dh, T ir, T iz, T in, T hr, T hz, T hn, T h,
                               T& d_ir, T& d_iz, T& d_in, T& d_hr, T& d_hz, T& d_hn, T& dh_prev) {
  const T r = sigmoid(ir + hr);
  const T z = sigmoid(iz + hz);
  const T n = rims_tanh(in + r * hn);
  const T dn_pre = dh * (T(1) - z) * (T(1) - n * n);
  const T dz_pre = dh * (h - n) * z * (T(1) - z);
  const T dr_pre = dn_pre * hn * r * (T(1) - r);
  d_ir = dr_pre;
  d_hr = dr_pre;
  d_iz = dz_pre;
  d_hz = dz_pre;
  d_in = dn_pre;
  d_hn = dn_pre * r;
  dh_prev = dh * z;
}

// ---- One element (row, j < H) of each op; the kernels and the CPU loops only iterate. ----
template <typename T>
RIMS_HD void masked_lstm_fwd_element(const MaskedLstmFwdParams<T>& p, int64_t row, int64_t j) {
  const int64_t s = row * p.state_row_stride + j;
  if (!p.mask[row]) {
    p.h_new[s] = p.h[s];
    p.c_new[s] = p.c[s];
    return;
  }
  const T* gt = p.gates + row * p.gates_row_stride + j;
  const int64_t H = p.hidden;
  lstm_pointwise_fwd(gt[0], gt[H], gt[2 * H], gt[3 * H], p.c[s], p.h_new[s], p.c_new[s]);
}

template <typename T>
RIMS_HD void masked_lstm_bwd_element(const MaskedLstmBwdParams<T>& p, int64_t row, int64_t j) {
  const int64_t s = row * p.state_row_stride + j;
  const int64_t H = p.hidden;
  T* dg = p.grad_gates + row * p.gates_row_stride + j;
  if (!p.mask[row]) {
    dg[0] = dg[H] = dg[2 * H] = dg[3 * H] = T(0);
    p.grad_h[s] = p.grad_h_new[s];
    p.grad_c[s] = p.grad_c_new[s];
    return;
  }
  const T* gt = p.gates + row * p.gates_row_stride + j;
  lstm_pointwise_bwd(p.grad_h_new[s], p.grad_c_new[s], gt[0], gt[H], gt[2 * H], gt[3 * H],
                     p.c[s], dg[0], dg[H], dg[2 * H], dg[3 * H], p.grad_c[s]);
  p.grad_h[s] = T(0);  // h enters only through gates; the caller propagates grad_gates
}

template <typename T>
RIMS_HD void masked_gru_fwd_element(const MaskedGruFwdParams<T>& p, int64_t row, int64_t j) {
  const int64_t s = row * p.state_row_stride + j;
  if (!p.mask[row]) {
    p.h_new[s] = p.h[s];
    return;
  }
  const int64_t g = row * p.gates_row_stride + j, H = p.hidden;
  const T* gi = p.gi + g;
  const T* gh = p.gh + g;
  p.h_new[s] = gru_pointwise_fwd(gi[0], gi[H], gi[2 * H], gh[0], gh[H], gh[2 * H], p.h[s]);
}

template <typename T>
RIMS_HD void masked_gru_bwd_element(const MaskedGruBwdParams<T>& p, int64_t row, int64_t j) {
  const int64_t s = row * p.state_row_stride + j;
  const int64_t g = row * p.gates_row_stride + j, H = p.hidden;
  T* dgi = p.grad_gi + g;
  T* dgh = p.grad_gh + g;
  if (!p.mask[row]) {
    dgi[0] = dgi[H] = dgi[2 * H] = T(0);
    dgh[0] = dgh[H] = dgh[2 * H] = T(0);
    p.grad_h[s] = p.grad_h_new[s];
    return;
  }
  const T* gi = p.gi + g;
  const T* gh = p.gh + g;
  gru_pointwise_bwd(p.grad_h_new[s], gi[0], gi[H], gi[2 * H], gh[0], gh[H], gh[2 * H], p.h[s],
                    dgi[0], dgi[H], dgi[2 * H], dgh[0], dgh[H], dgh[2 * H], p.grad_h[s]);
}

}  // namespace rims
