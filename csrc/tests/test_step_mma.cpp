// Host tests of kernels/step_mma.cuh (no torch, no GPU): the fused kernels' block product. Over
// a grid of batch sizes (one to several sample blocks, partial row tiles), operand widths (a
// partial k-step, exact k-steps, row strides past the width), weight column tiles (several
// column blocks, spare warps) and the three host item orders, every result element of the grid's
// blocks equals the plain sum over the operand width in order bit for bit (the product adds the
// same terms in the same order; the padding adds exact zeros), is handed to the epilogue exactly
// once, and no block writes past its shared memory; with the most row tiles per block and with the
// default block target. A wide operand takes fewer row tiles per block (the 128 KB staging
// budget) and still gives every element; the row-tile rule's choices at `paper` and `large`.
// Float and double.
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "host_exec.h"
#include "step_mma.cuh"

namespace {

int failures = 0;
int checks = 0;

template <typename C>
bool same_bits(C a, C b) { return std::memcmp(&a, &b, sizeof(C)) == 0; }

template <typename C>
void check_case(std::mt19937_64& rng, int64_t B, int64_t width, int64_t extra, int64_t tiles,
                int64_t target) {
  using rims::kMmaN;
  const int64_t lda = width + extra, kd = rims::mma_round_up(width, rims::kMmaK);
  const int64_t K = 2, n = tiles * kMmaN;
  std::uniform_real_distribution<double> u(-1, 1);
  // Operand rows (K, B, lda) and the transposed, zero-padded weight (K, n, kd), 64-byte aligned.
  std::vector<C> a(size_t(K * B * lda)), wbuf(size_t(K * n * kd) + 64 / sizeof(C), C(0));
  for (auto& v : a) v = C(u(rng));
  C* w = reinterpret_cast<C*>((reinterpret_cast<uintptr_t>(wbuf.data()) + 63) / 64 * 64);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < n; ++c)
      for (int64_t j = 0; j < width; ++j) w[(k * n + c) * kd + j] = C(u(rng));
  const rims::StepMmaGrid g{B, K, kd, tiles, target};
  std::vector<C> out(size_t(K * B * n), C(0));
  std::vector<int> seen(out.size(), 0);
  const int64_t bad = rims::run_host_blocks<C>(
      g.blocks(sizeof(C)), g.smem_elems(sizeof(C), sizeof(C)), [&](int64_t blk, C* smem) {
        const rims::StepMmaGrid::Block at = g.block(blk);
        const int64_t k = at.k;
        rims::step_mma_block<C>(
            rims::HostExec{}, smem, g, at.sb, a.data() + k * B * lda, lda, width, w + k * n * kd,
            at.ct0, [&](int64_t ct, int64_t bt, const C* st, int lane, int lanes) {
              for (int e = lane; e < rims::kMmaM * kMmaN; e += lanes) {
                const int64_t b = bt + e / kMmaN, c = ct * kMmaN + e % kMmaN;
                if (b >= B) continue;
                out[size_t((k * B + b) * n + c)] = st[e];
                ++seen[size_t((k * B + b) * n + c)];
              }
            });
      });
  ++checks;
  if (bad >= 0) {
    ++failures;
    std::printf("FAIL B=%ld width=%ld: block %ld wrote past its shared memory\n", long(B),
                long(width), long(bad));
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < n; ++c) {
        C want = C(0);
        for (int64_t j = 0; j < width; ++j) want += a[(k * B + b) * lda + j] * w[(k * n + c) * kd + j];
        const size_t i = size_t((k * B + b) * n + c);
        ++checks;
        if (seen[i] != 1 || !same_bits(out[i], want)) {
          if (++failures < 10)
            std::printf("FAIL B=%ld width=%ld tiles=%ld: (k %ld, b %ld, col %ld) seen %d, %g vs %g\n",
                        long(B), long(width), long(tiles), long(k), long(b), long(c), seen[i],
                        double(out[i]), double(want));
        }
      }
}

template <typename C>
void test_grid(std::mt19937_64& rng) {
  for (int order : {0, 1, 2}) {
    rims::set_host_item_order(order);
    // target 1: the most row tiles per block; the default: mostly one (small grids).
    for (int64_t target : {int64_t(1), rims::kStepMmaTargetBlocks})
      for (int64_t B : {1, 7, 8, 9, 64, 65, 130})
        for (int64_t width : {1, 15, 16, 17, 32, 40})  // 16, 32: whole rows, one block copy
          for (int64_t tiles : {1, 3, 9})
            check_case<C>(rng, B, width, width % 2 ? 3 : 0, tiles, target);
  }
  rims::set_host_item_order(0);
}

void test_row_tiles(std::mt19937_64& rng) {
  using G = rims::StepMmaGrid;
  ++checks;
  // The staging budget: kd = 2048 in double, 128 KB hold one 8-row tile, so 20 samples take
  // three blocks of 8 however few blocks that makes.
  const bool budget = G{20, 1, 2048, 1, 1}.row_tiles(8) == 1 &&
                      G{20, 1, 2048, 1, 1}.sample_blocks(8) == 3 &&
                      G{256, 1, 768, 1, 1}.row_tiles(2) == 8 && G{19, 1, 80, 1, 1}.row_tiles(8) == 3;
  // The block target, bf16 (gate_kd / output_kd and the warp tiles of rim_step_gates_grid and
  // rim_step_output_grid): `paper` gates (B 64, K 6, kd 176, 13 tiles) and output (kd 400, 4
  // tiles) one row tile (96 and 48 blocks); `large` gates (B 256, K 8, kd 768, 32 tiles) eight
  // (128 blocks), output (kd 1024, 8 tiles) two (128 blocks).
  const bool target = G{64, 6, 176, 13}.row_tiles(2) == 1 && G{64, 6, 176, 13}.blocks(2) == 96 &&
                      G{64, 6, 400, 4}.row_tiles(2) == 1 && G{64, 6, 400, 4}.blocks(2) == 48 &&
                      G{256, 8, 768, 32}.row_tiles(2) == 8 && G{256, 8, 768, 32}.blocks(2) == 128 &&
                      G{256, 8, 1024, 8}.row_tiles(2) == 2 && G{256, 8, 1024, 8}.blocks(2) == 128;
  if (!budget || !target) {
    ++failures;
    std::printf("FAIL StepMmaGrid::row_tiles (budget %d, target %d)\n", budget, target);
  }
  check_case<double>(rng, 20, 2040, 1, 1, 1);
  check_case<double>(rng, 20, 2048, 0, 1, 1);  // whole rows: the block copy, 4 rows of zeros
}

}  // namespace

int main() {
  std::mt19937_64 rng(7);
  test_grid<float>(rng);
  test_grid<double>(rng);
  test_row_tiles(rng);
  std::printf("step_mma: %d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
