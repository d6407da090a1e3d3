// Runtime dispatch of the CPU loops by instruction set, as ATen's CPU capability
// dispatch: kernels_<isa>.cpp each compile the loops for one capability into a table of
// entry points; this file picks, when first asked, the best table this CPU can run
// (or the one PYRNN_CPU_CAPABILITY names), and forwards the entry points of loops.h to it.
// Compiled for the baseline, like the rest of the library outside the loops.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include <unistd.h>

#include "loops.h"

namespace pyrnn::cpu {

extern const Kernels kernels_pyrnn_isa_default;
#if defined(__x86_64__)
extern const Kernels kernels_pyrnn_isa_avx2;
extern const Kernels kernels_pyrnn_isa_avx512;
extern const Kernels kernels_pyrnn_isa_avx512_bf16;
#endif

namespace {

std::atomic<const MatrixGemm*> g_matrix{nullptr};

struct Capability {
  const char* name;
  const Kernels* table;
  bool (*supported)();
};

// Worst first. __builtin_cpu_supports checks the CPU's flags and that the OS saves the
// registers (XCR0).
const Capability kCapabilities[] = {
    {"default", &kernels_pyrnn_isa_default, [] { return true; }},
#if defined(__x86_64__)
    {"avx2", &kernels_pyrnn_isa_avx2, [] { return __builtin_cpu_supports("x86-64-v3") > 0; }},
    {"avx512", &kernels_pyrnn_isa_avx512,
     [] { return __builtin_cpu_supports("x86-64-v4") > 0; }},
    {"avx512_bf16", &kernels_pyrnn_isa_avx512_bf16,
     [] {
       return __builtin_cpu_supports("x86-64-v4") > 0 &&
              __builtin_cpu_supports("avx512bf16") > 0;
     }},
    {"avx512_amx", &kernels_pyrnn_isa_avx512_bf16,
     [] {
       return __builtin_cpu_supports("x86-64-v4") > 0 &&
              __builtin_cpu_supports("avx512bf16") > 0 && g_matrix.load() != nullptr;
     }},
#endif
};
constexpr int kCount = sizeof(kCapabilities) / sizeof(kCapabilities[0]);

std::string join(bool supported_only) {
  std::string s;
  for (const Capability& c : kCapabilities)
    if (!supported_only || c.supported()) s += (s.empty() ? "" : ",") + std::string(c.name);
  return s;
}

int find(const char* name) {
  for (int i = 0; i < kCount; ++i)
    if (std::strcmp(kCapabilities[i].name, name) == 0 && kCapabilities[i].supported()) return i;
  return -1;
}

// The capability in use; -1 until first asked. An unknown or unsupported
// PYRNN_CPU_CAPABILITY leaves the best one in use (cpu_capability_error says why).
std::atomic<int> g_current{-1};
std::string g_env_error;

int current() {
  int i = g_current.load(std::memory_order_acquire);
  if (i >= 0) return i;
  int best = 0;
  for (int k = 0; k < kCount; ++k)
    if (kCapabilities[k].supported()) best = k;
  const char* env = std::getenv("PYRNN_CPU_CAPABILITY");
  if (env && *env) {
    const int want = find(env);
    if (want >= 0)
      best = want;
    else
      g_env_error = std::string("PYRNN_CPU_CAPABILITY: expected one of ") + join(true) +
                    " (the capabilities this CPU runs), got '" + env + "'";
  }
  int expected = -1;
  g_current.compare_exchange_strong(expected, best, std::memory_order_acq_rel);
  return g_current.load(std::memory_order_acquire);
}

const Kernels& table() { return *kCapabilities[current()].table; }
template <typename T>
const KernelsOf<T>& of();
template <>
const KernelsOf<float>& of<float>() { return table().f32; }
template <>  // only the baseline copy has float64 loops (kernels_impl.h)
const KernelsOf<double>& of<double>() { return kernels_pyrnn_isa_default.f64; }

}  // namespace

int64_t second_level_cache() {
  static const int64_t bytes = [] {
    const long n = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return n > 0 ? int64_t(n) : int64_t(512) << 10;
  }();
  return bytes;
}

static std::atomic<int64_t> g_gemm_rows{0};  // 0: the CPU's default
int64_t gemm_rows() {
  const int64_t n = g_gemm_rows.load(std::memory_order_relaxed);
  if (n > 0) return n;
  return cpu_is_intel() ? int64_t(12) : int64_t(8);
}
bool cpu_is_intel() {
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") > 0;
  }();
  return intel;
}
// The weight gradients' products on the BLAS (its tiles: kernels_impl.h, 512 columns
// wide), against pyrnn's kernel, measured on an Intel Xeon with AMX (2 threads,
// training, 11 - 25 interleaved rounds in one process, medians of the ratios): at
// T = 100, B = 32, H = 128 the LSTM trains in 0.93 - 0.94 of the time, the GRU 0.91, the
// Elman RNN 0.89; at H = 512 0.96 - 0.98, 0.99, 0.92 - 0.93; at T = 500, B = 8, H = 256
// 0.96 - 0.97, 0.95 - 0.97, 0.92; at T = 100, B = 64, H = 256 0.96 - 0.97 (all three); at
// T = 50, B = 32, H = 1024 the LSTM and GRU 1.00 - 1.01, the Elman RNN 0.96. With tiles
// 256 columns wide the LSTM and GRU at H = 512 read 0.98 - 1.00 and 1.02 - 1.04. At
// T = 100, B = 1, H = 64 (2^21 - 2^23 flops) 1.03 - 1.30: hence from 2^24 flops. The
// input projections and dX on MKL's packed product (tiles of at most 512 rows), against
// pyrnn's kernel (the same CPU, 9 - 11 rounds, the weight gradients on the BLAS in both):
// the LSTM at T = 100, B = 32, H = 512 infers in 0.92 - 0.97 of the time and trains in
// 0.93 - 1.00, at H = 1024 (T = 50) in 0.96 - 0.98; the Elman RNN at H = 512 trains in
// 0.92; at H = 128 (products of 2^26.6 and 2^28.6 flops) the Elman RNN and the LSTM train
// in 1.02, at T = 500, B = 8, H = 256 (2^29 - 2^31) 0.98 - 1.01: from 2^30 flops (2, 4 or
// 16 tiles at H = 512 read 0.92 - 1.00 too; 7 tiles, or 4 with a short one, left a thread
// idle: 1.06 - 1.08). On AMD CPUs that BLAS runs generic kernels: not taken there.
static std::atomic<int> g_blas{-1};  // -1: the CPU's default
int blas_products_mode() {
#ifdef PYRNN_NO_BLAS
  return 0;
#else
  return g_blas.load(std::memory_order_relaxed);
#endif
}
bool blas_products(int64_t M, int64_t N, int64_t K, double from) {
  const int mode = blas_products_mode();
  if (mode >= 0) return mode > 0;
  return cpu_is_intel() && 2.0 * M * N * K >= from;
}
bool packed_blas() {
#ifdef PYRNN_NO_BLAS
  return false;
#else
  return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute;
#endif
}
bool projection_on_blas(int64_t M, int64_t N, int64_t K) {
  // (K = 0: MKL's packed product leaves C as it was, where the result is the bias or 0)
  return K > 0 && !bf16_products() && packed_blas() &&
         blas_products(M, N, K, double(int64_t(1) << 30));
}
bool set_blas_products(int mode) {
  if (mode < -1 || mode > 1) return false;
  g_blas.store(mode, std::memory_order_relaxed);
  return true;
}
bool set_gemm_rows(int64_t rows) {
  if (rows < 0 || rows > 12) return false;
  g_gemm_rows.store(rows, std::memory_order_relaxed);
  return true;
}

void register_matrix_gemm(const MatrixGemm* g) { g_matrix.store(g); }
const MatrixGemm* matrix_gemm() {
  const MatrixGemm* g = g_matrix.load();
  return g && std::strcmp(kCapabilities[current()].name, "avx512_amx") == 0 && g->usable()
             ? g
             : nullptr;
}

static thread_local bool t_bf16 = false;
bool bf16_products() { return t_bf16; }
Bf16Products::Bf16Products(bool on) : prev_(t_bf16) { t_bf16 = on; }
Bf16Products::~Bf16Products() { t_bf16 = prev_; }

const char* compiled_capabilities() {
  static const std::string s = join(false);
  return s.c_str();
}
const char* supported_capabilities() {
  static const std::string s = join(true);
  return s.c_str();
}
const char* cpu_capability() { return kCapabilities[current()].name; }
const char* cpu_capability_error() {
  current();
  return g_env_error.c_str();
}
const char* baseline_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__x86_64__)
  return "x86-64";
#else
  return "other";
#endif
}
bool set_cpu_capability(const char* name) {
  const int i = find(name);
  if (i < 0) return false;
  g_current.store(i, std::memory_order_release);
  return true;
}

void forward_loop(int cell, const ForwardArgs<float>& p) { of<float>().forward[cell](p); }
void forward_loop(int cell, const ForwardArgs<double>& p) { of<double>().forward[cell](p); }
void backward_loop(int cell, const BackwardArgs<float>& p) { of<float>().backward[cell](p); }
void backward_loop(int cell, const BackwardArgs<double>& p) { of<double>().backward[cell](p); }


void matmul(const float* A, int64_t M, int64_t K, const float* Wm, int64_t N, bool transposed,
            float* C, int64_t ldc, const float* bias) {
  of<float>().matmul(A, M, K, Wm, N, transposed, C, ldc, bias);
}
void matmul(const double* A, int64_t M, int64_t K, const double* Wm, int64_t N, bool transposed,
            double* C, int64_t ldc, const double* bias) {
  of<double>().matmul(A, M, K, Wm, N, transposed, C, ldc, bias);
}
void matmul_tn(const float* A, int64_t M, int64_t K, const float* Bm, int64_t N,
               const float* B2, int64_t N2, float* C) {
  of<float>().matmul_tn(A, M, K, Bm, N, B2, N2, C);
}
void matmul_tn(const double* A, int64_t M, int64_t K, const double* Bm, int64_t N,
               const double* B2, int64_t N2, double* C) {
  of<double>().matmul_tn(A, M, K, Bm, N, B2, N2, C);
}
void column_sums(const float* A, int64_t M, int64_t N, float* out) {
  of<float>().column_sums(A, M, N, out);
}
void column_sums(const double* A, int64_t M, int64_t N, double* out) {
  of<double>().column_sums(A, M, N, out);
}

}  // namespace pyrnn::cpu
