// Test driver: runs the CUDA time loops of csrc/cuda (loops.h, kernels.cu, compiled here
// for the SIMT emulator) on cases written by tests/test_cuda_emu.py, and writes what the
// loops produced. The products inside the loop run on the CPU (CpuMm); the products
// outside it (input projection, weight gradients) are the test's, as they are ATen's in
// cuda_ops.cpp.
//
//   driver CASE...    reads each CASE file, writes CASE.out; exit status 1 if any case
//                     failed (its .out then holds an "error" entry with the report)
//
// File format (both ways): records of [int32 name length][name][int64 byte count][bytes],
// little-endian; scalars are 1-element int64 or float64 arrays.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu.h"

// Compile csrc/cuda as nvcc's device pass sees it: the cells' device code paths
// (math from the C library, the CUDA half conversions).
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#include "cuda/kernels.cu"
#include "cuda/loops.h"
#undef __CUDA_ARCH__
#undef __CUDACC__

namespace {

using namespace pyrnn;
using pyrnn::cuda::acc_t;
using Buf = std::vector<char>;

struct Case {
  std::map<std::string, Buf> in, out;

  bool has(const std::string& k) const { return in.count(k) != 0; }
  Buf& get(const std::string& k) {
    auto it = in.find(k);
    if (it == in.end()) throw std::runtime_error("case has no entry '" + k + "'");
    return it->second;
  }
  int64_t i(const std::string& k) {
    int64_t v;
    std::memcpy(&v, get(k).data(), 8);
    return v;
  }
  double f(const std::string& k) {
    double v;
    std::memcpy(&v, get(k).data(), 8);
    return v;
  }
  template <typename E>
  E* ptr(const std::string& k) {  // nullptr when absent
    return has(k) ? reinterpret_cast<E*>(get(k).data()) : nullptr;
  }
  // An output of n elements, filled with NaN (all bits set) as uninitialised device
  // memory might be, or with zeros where the op allocates with zeros.
  template <typename E>
  E* make(const std::string& k, int64_t n, bool zero = false) {
    Buf& b = out[k];
    b.assign(static_cast<size_t>(n) * sizeof(E), zero ? 0 : static_cast<char>(0xff));
    return reinterpret_cast<E*>(b.data());
  }
};

std::map<std::string, Buf> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::map<std::string, Buf> m;
  for (;;) {
    int32_t n;
    if (!f.read(reinterpret_cast<char*>(&n), 4)) break;
    std::string name(n, '\0');
    int64_t bytes;
    f.read(name.data(), n);
    f.read(reinterpret_cast<char*>(&bytes), 8);
    Buf b(bytes);
    if (!f.read(b.data(), bytes)) throw std::runtime_error("truncated " + path);
    m[name] = std::move(b);
  }
  return m;
}

void write_file(const std::string& path, const std::map<std::string, Buf>& m) {
  std::ofstream f(path, std::ios::binary);
  for (const auto& [name, b] : m) {
    const int32_t n = static_cast<int32_t>(name.size());
    const int64_t bytes = static_cast<int64_t>(b.size());
    f.write(reinterpret_cast<const char*>(&n), 4);
    f.write(name.data(), n);
    f.write(reinterpret_cast<const char*>(&bytes), 8);
    f.write(b.data(), bytes);
  }
  if (!f) throw std::runtime_error("cannot write " + path);
}

// Conversions between a storage type and its arithmetic type.
template <typename E>
acc_t<E> up(E v) {
  return load<acc_t<E>>(v);
}
template <typename E>
E down(acc_t<E> v) {
  return store<E>(v);
}

// The products inside the loop, on the CPU: accumulation in the arithmetic type (float
// for the 16-bit types, as cuBLAS's default), one rounding to E at the end.
struct CpuMm {
  template <typename E>
  void operator()(const cuda::Product<E>& g) const {
    using Acc = acc_t<E>;
    std::vector<Acc> row(g.N);
    for (int64_t i = 0; i < g.M; ++i) {
      const E* a = g.a + i * g.lda;
      if (g.b_transposed) {  // B [N, K]
        for (int64_t n = 0; n < g.N; ++n) {
          const E* b = g.b + n * g.ldb;
          Acc s = 0;
          for (int64_t k = 0; k < g.K; ++k) s += up(a[k]) * up(b[k]);
          row[n] = s;
        }
      } else {  // B [K, N]
        std::fill(row.begin(), row.end(), Acc(0));
        for (int64_t k = 0; k < g.K; ++k) {
          const Acc ak = up(a[k]);
          const E* b = g.b + k * g.ldb;
          for (int64_t n = 0; n < g.N; ++n) row[n] += ak * up(b[n]);
        }
      }
      E* c = g.c + i * g.ldc;
      for (int64_t n = 0; n < g.N; ++n) c[n] = down<E>(row[n] + (g.accumulate ? up(c[n]) : Acc(0)));
    }
  }
};

// Calls f(Cell{}) for the cell at index mode of the registry.
template <typename F>
void with_mode(int64_t mode, F&& f) {
  bool found = false;
  with_cell_at(int(mode), [&](auto cell) {
    found = true;
    f(cell);
  });
  if (!found) throw std::runtime_error("unknown mode " + std::to_string(mode));
}

// The cell's constants: the case's "k" (float64 values), in the registry's order.
template <typename T>
void set_constants(Case& c, cuda::StepArgs<T>& p) {
  if (!c.has("k")) return;
  const Buf& k = c.get("k");
  if (k.size() > sizeof p.k) throw std::runtime_error("too many constants");
  std::memcpy(p.k, k.data(), k.size());
}

template <typename T>
cudaError_t run_forward(Case& c) {
  const int64_t Tn = c.i("T"), B = c.i("B"), H = c.i("H"), W = c.i("W"), P = c.i("P");
  const int64_t proj = c.i("proj"), mode = c.i("mode"), G = c.i("G");
  cuda::StepArgs<T> p;
  p.steps = Tn; p.batch = B; p.hidden = H; p.width = W; p.reverse = c.i("reverse") != 0;
  p.lengths = c.ptr<int64_t>("lengths");
  p.ws = c.ptr<T>("ws");  // in: the input projection; out: what backward needs
  p.y = c.make<T>("y", Tn * B * P);
  p.b_hh = c.ptr<T>("b_hh");
  p.w_hh = c.ptr<T>("w_hh");
  p.proj = proj;
  p.w_hr = c.ptr<T>("w_hr");
  p.hg = c.make<T>("scratch_hg", B * G * H);
  p.cw = c.ptr<T>("cw");  // a layer-normalised cell's own weights
  set_constants(c, p);
  p.h = c.make<T>("h_n", B * P);
  std::memcpy(p.h, c.ptr<T>("h0"), sizeof(T) * B * P);
  if (c.has("c0")) {
    p.c = c.make<T>("c_n", B * H);
    std::memcpy(p.c, c.ptr<T>("c0"), sizeof(T) * B * H);
  }
  if (proj) {
    p.m = c.make<T>("scratch_m", B * H);
    p.hnew = c.make<T>("scratch_hnew", B * P);
  }
  cudaError_t e = cudaSuccess;
  with_mode(mode, [&](auto cell) {
    e = cuda::forward_loop<decltype(cell), T>(p, CpuMm{}, nullptr);
  });
  c.out["ws"] = c.get("ws");
  return e;
}

template <typename T>
cudaError_t run_backward(Case& c) {
  using A = acc_t<T>;
  constexpr bool narrow = !std::is_same_v<A, T>;
  const int64_t Tn = c.i("T"), B = c.i("B"), H = c.i("H"), W = c.i("W"), P = c.i("P");
  const int64_t proj = c.i("proj"), mode = c.i("mode"), G = c.i("G"), GH = G * H;
  const bool record = c.i("record") != 0;
  cuda::StepArgs<T> p;
  p.steps = Tn; p.batch = B; p.hidden = H; p.width = W; p.reverse = c.i("reverse") != 0;
  p.lengths = c.ptr<int64_t>("lengths");
  p.ws = W ? c.ptr<T>("ws") : nullptr;
  p.y = c.ptr<T>("y");
  p.h0 = c.ptr<T>("h0");
  p.c0 = c.ptr<T>("c0");
  p.w_hh = c.ptr<T>("w_hh");
  p.proj = proj;
  p.w_hr = c.ptr<T>("w_hr");
  p.dy = c.ptr<T>("dy");
  p.gx = c.make<T>("gx", Tn * B * GH);
  bool split = false, has_cell = false;
  with_mode(mode, [&](auto cell) {
    split = decltype(cell)::kSplitGrad;
    has_cell = decltype(cell)::kHasCell;
  });
  p.gh = split ? c.make<T>("gh", Tn * B * GH) : p.gx;
  p.cw = c.ptr<T>("cw");
  p.dnorm = p.cw ? c.make<T>("dnorm", Tn * B * H) : nullptr;
  set_constants(c, p);
  p.hprev = c.make<T>("hprev", Tn * B * P);
  // running dLoss/dh, dLoss/dc in A, from grad_h_n / grad_c_n (as cuda_ops.cpp)
  std::vector<A> dh(B * P, A(0)), dc(has_cell ? B * H : 0, A(0));
  if (const T* d = c.ptr<T>("dh_n"))
    for (int64_t k = 0; k < B * P; ++k) dh[k] = up(d[k]);
  if (const T* d = c.ptr<T>("dc_n"))
    for (int64_t k = 0; k < B * H; ++k) dc[k] = up(d[k]);
  p.dh = dh.data();
  p.dc = has_cell ? dc.data() : nullptr;
  p.clip = c.f("clip");
  T* norms = record ? c.make<T>("norms", 2 * Tn * B, true) : nullptr;
  p.norm_h = norms;
  p.norm_c = record && has_cell ? norms + Tn * B : nullptr;
  std::vector<A> w_hh_acc, w_hr_acc, gh_acc;
  if (narrow) {
    gh_acc.resize(B * GH);
    p.gh_acc = gh_acc.data();
    for (int64_t k = 0; k < GH * P; ++k) w_hh_acc.push_back(up(p.w_hh[k]));
    p.w_hh_acc = w_hh_acc.data();
    if (proj) {
      for (int64_t k = 0; k < P * H; ++k) w_hr_acc.push_back(up(p.w_hr[k]));
      p.w_hr_acc = w_hr_acc.data();
    }
  }
  if (proj) {
    p.dm = c.make<A>("scratch_dm", B * H);
    p.dhtot = c.make<A>("dhtot", Tn * B * P);
    p.mall = c.make<T>("mall", Tn * B * H);
  }
  cudaError_t e = cudaSuccess;
  with_mode(mode, [&](auto cell) {
    e = cuda::backward_loop<decltype(cell), T>(p, CpuMm{}, nullptr);
  });
  T* dh0 = c.make<T>("dh0", B * P);
  for (int64_t k = 0; k < B * P; ++k) dh0[k] = down<T>(dh[k]);
  if (has_cell) {
    T* dc0 = c.make<T>("dc0", B * H);
    for (int64_t k = 0; k < B * H; ++k) dc0[k] = down<T>(dc[k]);
  }
  return e;
}

template <typename T>
cudaError_t run(Case& c, const std::string& op) {
  return op == "forward" ? run_forward<T>(c) : run_backward<T>(c);
}

}  // namespace

int main(int argc, char** argv) {
  int failed = 0;
  for (int k = 1; k < argc; ++k) {
    const std::string path = argv[k];
    Case c;
    std::string error;
    try {
      c.in = read_file(path);
      const Buf& opb = c.get("op");
      const std::string op(opb.begin(), opb.end());
      cuda_emu::set_seed(static_cast<uint64_t>(c.i("seed")));
      cuda_emu::clear_report();
      cudaError_t e = cudaSuccess;
      switch (c.i("dtype")) {
        case 0: e = run<float>(c, op); break;
        case 1: e = run<double>(c, op); break;
        case 2: e = run<__half>(c, op); break;
        case 3: e = run<__nv_bfloat16>(c, op); break;
        default: throw std::runtime_error("unknown dtype");
      }
      if (e != cudaSuccess)
        error = std::string(cudaGetErrorString(e)) + ": " + cuda_emu::last_report();
    } catch (const std::exception& ex) {
      error = ex.what();
    }
    for (auto it = c.out.begin(); it != c.out.end();)  // scratch stays here
      it = it->first.rfind("scratch_", 0) == 0 ? c.out.erase(it) : std::next(it);
    if (!error.empty()) {
      ++failed;
      std::fprintf(stderr, "%s: %s\n", path.c_str(), error.c_str());
      c.out["error"] = Buf(error.begin(), error.end());
    }
    const cuda_emu::Stats s = cuda_emu::stats();
    const int64_t st[3] = {int64_t(s.launches), int64_t(s.blocks), int64_t(s.threads)};
    c.out["stats"] = Buf(reinterpret_cast<const char*>(st), reinterpret_cast<const char*>(st) + 24);
    write_file(path + ".out", c.out);
  }
  return failed ? 1 : 0;
}
