// Host tests of kernels/rim_seq_fwd.cuh (no torch, no GPU): the persistent forward's tile function
// run with HostExec on a small random problem. Its values are checked against the reference in
// tests/test_rim_seq.py; here, the invariants that do not need one: exactly top_k active mechanisms
// per sample and step, inactive mechanisms' h and c copied bit-exactly, out[T-1] == h_n, finite
// values, and tiles of 1, 2 and 8 samples giving bit-identical results (samples are independent,
// and each sample's arithmetic does not depend on its tile). LSTM and GRU, float and double,
// folded and per-head input terms. The cluster variant (blocks as host threads, cluster_host.h)
// with 1, 2 and 3 mechanisms per block (K = 5: 5, 3 and 2 blocks, the last with fewer) must be
// bit-identical to the single block: the same item code in the same order, split by mechanism.
// RunMechs, the enumeration of the mechanisms a tile runs, against a plain scan.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cluster_host.h"
#include "rim_seq_fwd.cuh"

namespace {

int failures = 0;
int checks = 0;

void expect(const char* what, bool ok) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

template <typename T>
struct Problem {
  rims::RimSeqDims d{};
  std::vector<T> keys, xsrc, wx, h0, c0, wq, whh, bih, bhh, cq, ck, cv, co;
};

template <typename T>
Problem<T> make(bool lstm, bool per_head, std::mt19937_64& rng) {
  Problem<T> pr;
  auto& d = pr.d;
  d.T_ = 4, d.B = 9, d.M = 2, d.K = 5, d.H = 3, d.GH = (lstm ? 4 : 3) * d.H;
  d.n_in = 2, d.dk = 3, d.nk = 6, d.n_c = 2, d.dc = 2, d.dcv = 3, d.ck = 4, d.cv = 6, d.top_k = 2;
  d.Dx = per_head ? 4 : 5;
  d.xrow = per_head ? d.n_in * d.Dx : d.Dx;
  d.xhead = per_head ? d.Dx : 0;
  d.lstm = lstm, d.p_in = 0.0, d.p_c = 0.0, d.seed = 3, d.S = 1;
  std::normal_distribution<double> n(0.0, 0.5);
  auto fill = [&](std::vector<T>& v, int64_t size) {
    v.resize(size);
    for (auto& e : v) e = T(n(rng));
  };
  fill(pr.keys, d.T_ * d.B * d.M * d.nk);
  fill(pr.xsrc, d.T_ * d.B * d.M * d.xrow);
  fill(pr.wx, d.K * d.n_in * d.Dx * d.GH);
  fill(pr.h0, d.B * d.K * d.H);
  fill(pr.c0, lstm ? d.B * d.K * d.H : 0);
  fill(pr.wq, d.K * d.H * d.nk);
  fill(pr.whh, d.K * d.H * d.GH);
  fill(pr.bih, d.K * d.GH);
  fill(pr.bhh, d.K * d.GH);
  fill(pr.cq, d.K * d.H * d.ck);
  fill(pr.ck, d.K * d.H * d.ck);
  fill(pr.cv, d.K * d.H * d.cv);
  fill(pr.co, d.K * d.cv * d.H);
  return pr;
}

template <typename T>
struct Result {
  std::vector<T> out, h_n, c_n;
  std::vector<char> masks;
};

// kpr > 0: the cluster variant with kpr mechanisms per block, `resident` weights in its shared
// memory.
template <typename T>
Result<T> run(const Problem<T>& pr, int64_t S, int64_t kpr = 0, int64_t resident = 0) {
  rims::RimSeqFwdParams<T> p{};  // value-initialized: every pointer not set below is null (no saving)
  static_cast<rims::RimSeqDims&>(p) = pr.d;
  p.S = S;
  p.kpr = kpr;
  p.resident = resident;
  const auto& d = pr.d;
  Result<T> r;
  r.out.resize(d.T_ * d.B * d.K * d.H);
  r.h_n.resize(d.B * d.K * d.H);
  r.c_n.resize(d.lstm ? d.B * d.K * d.H : 0);
  bool* masks = new bool[d.T_ * d.B * d.K];
  p.keys = pr.keys.data(), p.xsrc = pr.xsrc.data(), p.w_x = pr.wx.data();
  p.h0 = pr.h0.data(), p.c0 = d.lstm ? pr.c0.data() : nullptr;
  p.w_query = pr.wq.data(), p.w_hh = pr.whh.data(), p.b_ih = pr.bih.data();
  p.b_hh = pr.bhh.data(), p.c_query = pr.cq.data(), p.c_key = pr.ck.data();
  p.c_value = pr.cv.data(), p.c_output = pr.co.data();
  p.out = r.out.data(), p.h_n = r.h_n.data(), p.c_n = d.lstm ? r.c_n.data() : nullptr;
  p.masks = masks;
  const int64_t elems = (rims::rim_seq_fwd_smem_bytes(p, S, sizeof(T), sizeof(T)) + sizeof(T) - 1)
                       / sizeof(T);
  const int64_t ranks = kpr > 0 ? (d.K + kpr - 1) / kpr : 1;
  std::vector<T> smem(ranks * elems);
  std::vector<char*> bases;
  for (int64_t r = 0; r < ranks; ++r) bases.push_back(reinterpret_cast<char*>(&smem[r * elems]));
  for (int64_t tile = 0; tile * S < d.B; ++tile) {
    if (kpr == 0) {
      rims::rim_seq_fwd_tile<8, T>(rims::HostExec{}, p, tile, smem.data());
      continue;
    }
    rims::run_cluster_on_host(bases, [&](const rims::ClusterHostExec& ex, int rank) {
      rims::rim_seq_fwd_tile<8, T, false, true>(ex, p, tile,
                                                reinterpret_cast<T*>(bases[rank]), rank);
    });
  }
  r.masks.assign(masks, masks + d.T_ * d.B * d.K);
  delete[] masks;
  return r;
}

template <typename T>
void test(bool lstm, bool per_head, std::mt19937_64& rng) {
  const Problem<T> pr = make<T>(lstm, per_head, rng);
  const auto& d = pr.d;
  const Result<T> r1 = run(pr, 1);
  const int64_t KH = d.K * d.H;
  bool top_k_ok = true, finite = true, copies = true;
  for (int64_t t = 0; t < d.T_; ++t)
    for (int64_t b = 0; b < d.B; ++b) {
      int active = 0;
      for (int64_t k = 0; k < d.K; ++k) {
        const bool on = r1.masks[(t * d.B + b) * d.K + k];
        active += on;
        for (int64_t j = 0; j < d.H; ++j) {
          const int64_t i = b * KH + k * d.H + j;
          const T now = r1.out[t * d.B * KH + i];
          const T before = t == 0 ? pr.h0[i] : r1.out[(t - 1) * d.B * KH + i];
          finite = finite && std::isfinite(double(now));
          if (!on) copies = copies && now == before;  // inactive: h copied exactly
        }
      }
      top_k_ok = top_k_ok && active == d.top_k;
    }
  expect("exactly top_k active per sample and step", top_k_ok);
  expect("outputs finite", finite);
  expect("inactive mechanisms copy h bit-exactly", copies);
  bool last = true;
  for (int64_t i = 0; i < d.B * KH; ++i) last = last && r1.out[(d.T_ - 1) * d.B * KH + i] == r1.h_n[i];
  expect("out[T-1] == h_n", last);
  for (int64_t S : {2, 8}) {
    const Result<T> rs = run(pr, S);
    expect("tiles give identical out", rs.out == r1.out);
    expect("tiles give identical h_n, c_n", rs.h_n == r1.h_n && rs.c_n == r1.c_n);
    expect("tiles give identical masks", rs.masks == r1.masks);
  }
  for (int64_t kpr : {1, 2, 3})
  for (int64_t resident : {int64_t(0), rims::kResAll, rims::kResWhh | rims::kResCValue,
                           rims::kResWx | rims::kResCOutput | rims::kResWQuery}) {
    const Result<T> rc = run(pr, 3, kpr, resident);
    expect("cluster gives identical out", rc.out == r1.out);
    expect("cluster gives identical h_n, c_n", rc.h_n == r1.h_n && rc.c_n == r1.c_n);
    expect("cluster gives identical masks", rc.masks == r1.masks);
  }
}

// RunMechs (the mechanisms some sample of a tile runs): for random act rows over S samples and
// kn own mechanisms (row stride kst >= kn, as in a cluster block), nth(q) lists the running
// ones ascending, nth(q, false) the others, ordered(q) both in that order; more than 64 rows or
// mechanisms: every mechanism, in order.
void test_run_mechs(std::mt19937_64& rng) {
  for (int trial = 0; trial < 2000; ++trial) {
    const int S = 1 + int(rng() % 9), kn = 1 + int(rng() % 12), kst = kn + int(rng() % 3);
    std::vector<float> act(size_t(S) * kst, 0.f);
    for (auto& a : act) a = rng() % 3 == 0 ? 1.f : 0.f;
    const rims::RunMechs r = rims::run_mechs(act.data(), S, kn, kst);
    std::vector<int> on, off;
    for (int k = 0; k < kn; ++k) {
      bool any = false;
      for (int s = 0; s < S; ++s) any = any || act[size_t(s) * kst + k] != 0.f;
      (any || S * kn > 64 ? on : off).push_back(k);
    }
    expect("RunMechs fallback iff more than 64 rows", r.all == (S * kn > 64));
    expect("RunMechs count", r.count == int(on.size()));
    for (int q = 0; q < int(on.size()); ++q) {
      expect("RunMechs nth(on)", r.nth(q) == on[q]);
      expect("RunMechs ordered (running first)", r.ordered(q) == on[q]);
    }
    for (int q = 0; q < int(off.size()); ++q) {
      expect("RunMechs nth(off)", r.nth(q, false) == off[q]);
      expect("RunMechs ordered (then the others)", r.ordered(int(on.size()) + q) == off[q]);
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(11);
  test_run_mechs(rng);
  for (bool lstm : {true, false})
    for (bool per_head : {false, true}) {
      test<float>(lstm, per_head, rng);
      test<double>(lstm, per_head, rng);
    }
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
