// The float32 FMA throughput of this CPU: every thread runs 12 independent chains of
// vector FMAs on registers (no memory traffic), the widest vectors the compiler targets
// (16 lanes with AVX-512, 8 with AVX2). The roof that no product can pass; the README
// compares pyrnn's products and whole calls against it. Built for a CPU with AVX512-BF16
// (-march=native there), it then measures the same for vdpbf16ps, the instruction of
// pyrnn's bfloat16 products: each one sums two products per float32 lane (4 flops).
//
//     g++ -O3 -march=native -fopenmp benchmarks/fma_peak.cpp -o fma_peak
//     OMP_NUM_THREADS=2 ./fma_peak [iterations, default 1e8]
#include <omp.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <chrono>
#include <cstdio>
#include <cstdlib>

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vec __attribute__((vector_size(4 * kLanes)));
constexpr int kChains = 12;  // enough to cover the latency on two pipes

// GFLOP/s of kIters rounds of kChains independent chains acc = step(acc) on registers
// (chain i starts at init(i)), per thread, printed under name and summed over the threads.
template <class Init, class Step>
double roof(const char* name, long kIters, double flops_per_step, Init init, Step step) {
  double total = 0;
  float keep = 0;
#pragma omp parallel reduction(+ : total, keep)
  {
    decltype(init(0)) acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = init(i + omp_get_thread_num());
    const auto t0 = std::chrono::steady_clock::now();
    for (long k = 0; k < kIters; ++k)
      for (int i = 0; i < kChains; ++i) acc[i] = step(acc[i]);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double gflops = flops_per_step * kChains * kIters / s / 1e9;
#pragma omp critical
    std::printf("thread %d: %.1f GFLOP/s\n", omp_get_thread_num(), gflops);
    total += gflops;
    for (int i = 0; i < kChains; ++i) keep += float(acc[i][0]);
  }
  std::printf("%s, %d threads: %.1f GFLOP/s (checksum %g)\n", name, omp_get_max_threads(),
              total, keep);
  return total;
}

int main(int argc, char** argv) {
  const long kIters = argc > 1 ? std::atol(argv[1]) : 100000000;
  const vec a = vec{} + 0.999f, b = vec{} + 0.0001f;
  char name[64];
  std::snprintf(name, sizeof name, "%d-lane float32 FMAs", kLanes);
  roof(name, kIters, 2.0 * kLanes, [](int i) { return vec{} + 0.001f * float(i); },
       [&](vec acc) { return acc * a + b; });
#if defined(__AVX512BF16__)
  // bfloat16 pairs (0.996, 0.996) and (1.0e-4, 1.0e-4): the sums grow slowly, no overflow
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f);
  const __m512bh y = (__m512bh)_mm512_set1_epi32(0x38d138d1);
  roof("16-lane bfloat16 pair dots (vdpbf16ps)", kIters, 4.0 * 16,
       [](int i) { return _mm512_set1_ps(0.001f * float(i)); },
       [&](__m512 acc) { return _mm512_dpbf16_ps(acc, x, y); });
#endif
  return 0;
}
