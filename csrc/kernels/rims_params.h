// Torch-free parameter blocks for the rims_fast kernels.
//
// Plain pointers and sizes only, so the same structs are filled by the torch launchers
// (csrc/masked_cell.cu, csrc/masked_cell_cpu.cpp) and by host tests that never see torch.
// All strides are in elements. A "row" is one (sample, mechanism) pair, rows = B * K.
#pragma once

#include <cstdint>

namespace rims {

// Masked LSTM cell. gates row r starts at gates + r * gates_row_stride and holds the four
// blocks (i, f, g, o) of H elements each; h, c and the outputs have rows of H elements.
template <typename T>
struct MaskedLstmFwdParams {
  const T* gates;
  const T* h;
  const T* c;
  const bool* mask;  // (rows,), true = active
  T* h_new;
  T* c_new;
  int64_t rows;
  int64_t hidden;            // H
  int64_t gates_row_stride;  // >= 4 * H
  int64_t state_row_stride;  // >= H, shared by h, c and the outputs
};

template <typename T>
struct MaskedLstmBwdParams {
  const T* grad_h_new;
  const T* grad_c_new;
  const T* gates;
  const T* c;
  const bool* mask;
  T* grad_gates;
  T* grad_h;
  T* grad_c;
  int64_t rows;
  int64_t hidden;
  int64_t gates_row_stride;
  int64_t state_row_stride;
};

// Masked GRU cell. gi (input term + bias_ih) and gh (recurrent term + bias_hh) rows hold the
// three blocks (r, z, n) of H elements each.
template <typename T>
struct MaskedGruFwdParams {
  const T* gi;
  const T* gh;
  const T* h;
  const bool* mask;
  T* h_new;
  int64_t rows;
  int64_t hidden;
  int64_t gates_row_stride;  // >= 3 * H, shared by gi and gh
  int64_t state_row_stride;
};

template <typename T>
struct MaskedGruBwdParams {
  const T* grad_h_new;
  const T* gi;
  const T* gh;
  const T* h;
  const bool* mask;
  T* grad_gi;
  T* grad_gh;
  T* grad_h;
  int64_t rows;
  int64_t hidden;
  int64_t gates_row_stride;
  int64_t state_row_stride;
};

}  // namespace rims
