// Host test of the cluster variant of kernels/rim_seq_fwd.cuh (no torch, no GPU) under an
// adversarial schedule: between cluster barriers the blocks run one at a time, in forward,
// reverse or rotating order, so a read of another block's data before the barrier that publishes
// it sees the wrong value; shared memory is NaN until its block starts (so a push before the
// first barrier is lost), every output starts as NaN, and a block's shared memory is poisoned
// with NaN when it exits (a late remote access shows). Every output (out, h_n, c_n, masks and
// the 9 saved histories, with dropout) must be bit-identical to the single block run in order,
// with each block's items in order, reversed or permuted (host_exec.h) as well, for 1..5
// mechanisms per block (K = 5), tiles of 1 and 3, LSTM and GRU, weights read from global memory
// or all resident, with float storage computed in float and in double (the storage and compute
// types' sizes differ, as bf16 storage with float compute on the GPU: the shared-memory layout
// must size each region by its own type). (The free-running threads of cluster_host.h are what
// the pytest host runs use.)
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>
#include "rim_seq_fwd.cuh"
using namespace rims;

struct Sched {
  std::mutex mu; std::condition_variable cv; int R, pos = 0, seg = 0, mode;
  std::vector<int> order() { std::vector<int> o(R); for (int i = 0; i < R; ++i) {
      int r = mode == 0 ? i : mode == 1 ? R - 1 - i : (i + seg) % R; o[i] = r; } return o; }
  void wait_turn(int r, std::unique_lock<std::mutex>& l) { cv.wait(l, [&] { return order()[pos] == r; }); }
};
struct AdvExec : HostExec {
  int rank; Sched* s; const std::vector<char*>* bases;
  void cluster_sync() const {
    std::unique_lock<std::mutex> l(s->mu);
    if (++s->pos == s->R) { s->pos = 0; ++s->seg; }
    s->cv.notify_all();
    s->wait_turn(rank, l);
  }
  template <class P> P* peer(P* ptr, int r) const {
    return reinterpret_cast<P*>((*bases)[r] + (reinterpret_cast<const char*>(ptr) - (*bases)[rank]));
  }
};

// C: the compute type (keys, xsrc, w_x and the saved histories are in it); storage float.
template <typename C>
void run_cases(int& runs, int& fails) {
  std::mt19937 g(1); std::normal_distribution<float> nd(0.f, 0.7f);
  RimSeqFwdParams<float> p{};
  for (int lstm = 0; lstm < 2; ++lstm)
  for (int S = 1; S <= 3; S += 2) {
    p.T_ = 3; p.B = 5; p.M = 2; p.K = 5; p.H = 4; p.lstm = lstm; p.GH = (lstm ? 4 : 3) * p.H;
    p.n_in = 2; p.dk = 3; p.nk = 6; p.Dx = 3; p.xrow = 6; p.xhead = 3; p.n_c = 2; p.dc = 2;
    p.dcv = 3; p.ck = 4; p.cv = 6; p.top_k = 3; p.S = S; p.p_in = 0.3; p.p_c = 0.2; p.seed = 7;
    const int64_t T = p.T_, B = p.B, M = p.M, K = p.K, H = p.H, GH = p.GH, GW = lstm ? GH : 2 * GH;
    auto rnd = [&](int64_t n) { std::vector<float> v(n); for (auto& x : v) x = nd(g); return v; };
    auto rndc = [&](int64_t n) { std::vector<C> v(n); for (auto& x : v) x = C(nd(g)); return v; };
    auto keys = rndc(T * B * M * p.nk), xs = rndc(T * B * M * p.xrow), wx = rndc(K * p.n_in * p.Dx * GH);
    auto h0 = rnd(B * K * H), c0 = rnd(B * K * H);
    auto wq = rnd(K * H * p.nk), whh = rnd(K * H * GH), bih = rnd(K * GH),
         bhh = rnd(K * GH), cq = rnd(K * H * p.ck), ck = rnd(K * H * p.ck), cvv = rnd(K * H * p.cv), co = rnd(K * p.cv * H);
    p.keys = keys.data(); p.xsrc = xs.data(); p.h0 = h0.data(); p.c0 = lstm ? c0.data() : nullptr;
    p.w_query = wq.data(); p.w_hh = whh.data(); p.w_x = wx.data(); p.b_ih = bih.data(); p.b_hh = bhh.data();
    p.c_query = cq.data(); p.c_key = ck.data(); p.c_value = cvv.data(); p.c_output = co.data();
    const int64_t widths[9] = {H, H, H, p.nk, p.n_in * M, GW, 2 * p.ck + p.cv, p.n_c * K, p.cv};
    // o[0..2]: out, h_n, c_n (float); o[3..11]: the saved histories (compute type), as bytes.
    auto run = [&](int kpr, int mode, int64_t res, std::vector<std::vector<char>>& o, std::vector<char>& masks) {
      o.assign(12, {});
      auto nan_fill = [](std::vector<char>& v, int64_t n, int64_t size) {
        v.resize(n * size);
        for (int64_t i = 0; i < n; ++i) {
          if (size == 4) { float x = NAN; std::memcpy(&v[i * 4], &x, 4); }
          else { double x = NAN; std::memcpy(&v[i * 8], &x, 8); }
        }
      };
      nan_fill(o[0], T * B * K * H, 4); nan_fill(o[1], B * K * H, 4); nan_fill(o[2], B * K * H, 4);
      for (int i = 0; i < 9; ++i) nan_fill(o[3 + i], T * B * K * widths[i], sizeof(C));
      masks.assign(T * B * K, 2);
      p.out = reinterpret_cast<float*>(o[0].data()); p.h_n = reinterpret_cast<float*>(o[1].data());
      p.c_n = lstm ? reinterpret_cast<float*>(o[2].data()) : nullptr;
      p.masks = reinterpret_cast<bool*>(masks.data());
      void** sv[] = {&p.sv_h, &p.sv_c, &p.sv_ht, &p.sv_q, &p.sv_a, &p.sv_g, &p.sv_qkv, &p.sv_bp, &p.sv_o};
      for (int i = 0; i < 9; ++i) *sv[i] = o[3 + i].data();
      p.kpr = kpr; p.resident = res;
      const int64_t el = (rim_seq_fwd_smem_bytes(p, p.S, sizeof(float), sizeof(C)) + sizeof(C) - 1) / sizeof(C);
      for (int64_t tile = 0; tile * p.S < B; ++tile) {
        if (kpr == 0) { std::vector<C> sm(el, C(NAN)); rim_seq_fwd_tile<8, C>(HostExec{}, p, tile, sm.data()); continue; }
        const int R = (K + kpr - 1) / kpr;
        std::vector<std::vector<C>> bufs(R, std::vector<C>(el, C(NAN))); std::vector<char*> bases;
        for (auto& b : bufs) bases.push_back(reinterpret_cast<char*>(b.data()));
        Sched s; s.R = R; s.mode = mode; std::vector<std::thread> th;
        for (int r = 0; r < R; ++r) th.emplace_back([&, r] {
          {  // a block's shared memory is undefined until it starts: a push before then is lost
            std::unique_lock<std::mutex> l(s.mu); s.wait_turn(r, l);
            std::fill(bufs[r].begin(), bufs[r].end(), C(NAN));
          }
          AdvExec ex; ex.rank = r; ex.s = &s; ex.bases = &bases;
          rim_seq_fwd_tile<8, C, false, true>(ex, p, tile, reinterpret_cast<C*>(bases[r]), r);
          // after the final cluster_sync: poison own smem as if the block exited, then pass the turn
          std::unique_lock<std::mutex> l(s.mu);
          std::fill(bufs[r].begin(), bufs[r].end(), C(NAN));
          if (++s.pos == s.R) { s.pos = 0; ++s.seg; } s.cv.notify_all();
        });
        for (auto& t : th) t.join();
      }
    };
    std::vector<std::vector<char>> base, got; std::vector<char> mb, mg;
    run(0, 0, 0, base, mb);
    for (int kpr = 1; kpr <= 5; ++kpr) for (int mode = 0; mode < 3; ++mode) for (int64_t res : {int64_t(0), kResAll}) {
      // Each block's items in order, reversed, permuted (host_exec.h), paired with the block
      // schedule of the same number (forward, reverse, rotating) to keep the run count.
      set_host_item_order(mode);
      run(kpr, mode, res, got, mg); ++runs;
      set_host_item_order(0);
      bool ok = mb == mg;
      for (int i = 0; i < 12; ++i) ok = ok && base[i] == got[i];
      if (!ok) { ++fails; std::printf("MISMATCH C=%zu lstm=%d S=%d kpr=%d mode=%d res=%d\n", sizeof(C), lstm, S, kpr, mode, int(res)); }
    }
  }
}

int main() {
  int runs = 0, fails = 0;
  run_cases<float>(runs, fails);
  run_cases<double>(runs, fails);
  std::printf("%d runs, %d mismatches\n", runs, fails);
  return runs > 0 && fails == 0 ? 0 : 1;
}
