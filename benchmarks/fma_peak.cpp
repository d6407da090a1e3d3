// The float32 FMA throughput of this CPU: every thread runs 12 independent chains of
// vector FMAs on registers (no memory traffic), the widest vectors the compiler targets
// (16 lanes with AVX-512, 8 with AVX2). The roof that no product can pass; the README
// compares pyrnn's products and whole calls against it.
//
//     g++ -O3 -march=native -fopenmp benchmarks/fma_peak.cpp -o fma_peak
//     OMP_NUM_THREADS=2 ./fma_peak [iterations, default 1e8]
#include <omp.h>

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

int main(int argc, char** argv) {
  constexpr int kChains = 12;  // enough to cover the FMA latency on two pipes
  const long kIters = argc > 1 ? std::atol(argv[1]) : 100000000;
  double total = 0;
  float keep = 0;
#pragma omp parallel reduction(+ : total, keep)
  {
    vec acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = vec{} + 0.001f * float(i + omp_get_thread_num());
    const vec a = vec{} + 0.999f, b = vec{} + 0.0001f;
    const auto t0 = std::chrono::steady_clock::now();
    for (long k = 0; k < kIters; ++k)
      for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * a + b;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double gflops = 2.0 * kLanes * kChains * kIters / s / 1e9;
#pragma omp critical
    std::printf("thread %d: %.1f GFLOP/s\n", omp_get_thread_num(), gflops);
    total += gflops;
    for (int i = 0; i < kChains; ++i)
      for (int l = 0; l < kLanes; ++l) keep += acc[i][l];
  }
  std::printf("%d-lane float32 FMAs, %d threads: %.1f GFLOP/s (checksum %g)\n", kLanes,
              omp_get_max_threads(), total, keep);
  return 0;
}
