// CPU time loops: the fused forward and BPTT of one layer in one direction, for each
// cell of the registry (csrc/cells/registry.h) and T in {float, double}. Raw pointers
// only; every buffer a call returns or keeps is allocated by the caller (the loops
// allocate their own scratch: a second h buffer, packed weights), and they never touch
// Python. Defined in loops_impl.h, compiled
// once per CPU capability by kernels_<isa>.cpp (see kernels_impl.h).
//
// Shapes (one layer, one direction):
//   ws:     [T, B, W]  per-step workspace row; its first G*H entries hold the input
//                      projection on entry (or, with project, once the loop has
//                      computed it) and the activated gates on exit, then
//                      Cell::kSaved*H saved values, then (LSTM) c_t
//   y:      [T, B, H]  output; zero at steps past a sequence's length
//   h0, h_n: [B, H]    (c0, c_n likewise for a cell with a cell state)
//   w_hh:   [G*H, H],  b_hh: [G*H] or nullptr
//   lengths:[B] or nullptr: step t of sequence b runs iff t < lengths[b], in either
//           direction, so a reversed sequence starts at its own last step.
#pragma once
#include <cstddef>
#include <cstdint>

// MKL's packed float32 product (in the MKL that libtorch links on x86-64, absent
// elsewhere: see packed_blas()).
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k,
                         const float* a, int lda, const float* b, int ldb, float beta, float* c,
                         int ldc) __attribute__((weak));
}

namespace pyrnn::cpu {

// What the forward and BPTT of a layer both read: its shape and the forward's inputs.
template <typename T>
struct LayerArgs {
  int64_t steps = 0, batch = 0, hidden = 0, width = 0;  // T, B, H, W
  bool reverse = false;
  const int64_t* lengths = nullptr;
  const T* h0 = nullptr;      // [B, P]
  const T* c0 = nullptr;      // [B, H] (a cell with a cell state), else nullptr
  const T* w_hh = nullptr;    // [G*H, P]
  const double* k = nullptr;  // the cell's constants (kParams), or nullptr if it has none
  const T* cw = nullptr;      // the cell's own weights (Cell::kLayerNorm), else nullptr
  // LSTM with a projection h_t = W_hr (o_t * tanh(c_t)): h, y, h0, h_n, dh0, hprev and
  // dy are P wide instead of H; the rest keeps H.
  int64_t proj = 0;           // P (0: no projection, P = H)
  const T* w_hr = nullptr;    // [P, H]
};

// The forward: what it reads (LayerArgs and below), writes and uses as scratch.
template <typename T>
struct ForwardArgs : LayerArgs<T> {
  T* ws = nullptr;            // [T, B, W] in: the input projection (unless project);
                              // out: what BPTT needs (see above)
  const T* b_hh = nullptr;    // [G*H] or nullptr
  T* y = nullptr;             // [T, B, P] out
  T* h_n = nullptr;           // [B, P] out: h_n (the loop keeps its running state here)
  T* c_n = nullptr;           // [B, H] out: c_n, likewise (a cell with a cell state)
  T* hg = nullptr;            // [B, G*H] scratch: h_{t-1} @ W_hh^T
  T* m = nullptr;             // [B, H] scratch (projection): m_t = o * tanh(c_t)
  // Optional (float32): with project set, the loop computes each step's input projection
  // x_t @ W_ih^T + b_ih into the first G*H entries of ws itself. ws then holds the rows
  // of one step only, reused at every step, or with every_step (a forward that saves
  // for BPTT) the rows of every step.
  bool project = false;
  bool every_step = false;
  const T* x = nullptr;       // [T, B, I] (nullptr when it is empty)
  const T* w_ih = nullptr;    // [G*H, I]
  const T* b_ih = nullptr;    // [G*H] or nullptr
  int64_t input = 0;          // I
};

// BPTT: what it reads (LayerArgs, the forward's results, the incoming gradients) and
// writes.
template <typename T>
struct BackwardArgs : LayerArgs<T> {
  const T* ws = nullptr;      // [T, B, W] the forward's workspace
  const T* y = nullptr;       // [T, B, P] the forward's output
  const T* dy = nullptr;      // [T, B, P] dLoss/dy
  const T* dh_n = nullptr;    // [B, P] dLoss/dh_n or nullptr (zero)
  const T* dc_n = nullptr;    // [B, H] dLoss/dc_n or nullptr (zero)
  T* gx = nullptr;            // [T, B, G*H] out: gate gradients, input side
  T* gh = nullptr;            // [T, B, G*H] out: gate gradients, recurrent side
                              // (Cell::kSplitGrad; else == gx)
  T* hprev = nullptr;         // [T, B, P] out: h_{t-1} of every active step (for dW_hh)
  T* dh0 = nullptr;           // [B, P] out: dLoss/dh0 (the loop keeps the running
                              // dLoss/dh_t here)
  T* dc0 = nullptr;           // [B, H] out: dLoss/dc0, likewise
  double clip = 0;            // <= 0: off
  T* norm_h = nullptr;        // [T, B] out or nullptr: ||dLoss/dh_t|| per step and sample
  T* norm_c = nullptr;        // [T, B] out or nullptr: ||dLoss/dc_t|| (a cell state)
  T* u_out = nullptr;         // [T, B, H] out or nullptr (Elman cells): gh_t @ W_hh of
                              // every step t, the part of dLoss/dh_{t-1} that flows
                              // through t (the vanishing-gradient regulariser's u); 0 at
                              // inactive steps
  T* dnorm = nullptr;         // [T, B, H] out (Cell::kLayerNorm): dLoss/d(LN(c_t) gamma_c
                              // + beta_c) of every step, 0 at inactive steps
  T* dm = nullptr;            // [B, H] scratch (projection): dLoss/dm_t
  T* dhtot = nullptr;         // [T, B, P] out (projection): total dLoss/dh_t of every step
  T* mall = nullptr;          // [T, B, H] out (projection): m_t of every step
};

// The entry points of one compiled copy of the loops (kernels_impl.h), for one T; the
// loops are indexed by the cell's place in the registry (AllCells).
template <typename T>
struct KernelsOf {
  void (*const* forward)(const ForwardArgs<T>&);   // [number of cells]
  void (*const* backward)(const BackwardArgs<T>&);  // [number of cells]
  void (*matmul)(const T*, int64_t, int64_t, const T*, int64_t, bool, T*, int64_t, const T*);
  void (*matmul_tn)(const T*, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*);
  void (*column_sums)(const T*, int64_t, int64_t, T*);
};
struct Kernels {
  KernelsOf<float> f32;
  KernelsOf<double> f64;  // the baseline copy's only; empty in the others
};

// bfloat16 products: while a Bf16Products(true) is alive on a thread, the float32 loops
// and products it starts multiply operands rounded to bfloat16 and sum in float32 (the
// op runs a layer whose weights are bfloat16 so; see gemm.h).
bool bf16_products();
class Bf16Products {
 public:
  explicit Bf16Products(bool on);
  ~Bf16Products();
  Bf16Products(const Bf16Products&) = delete;
  Bf16Products& operator=(const Bf16Products&) = delete;

 private:
  bool prev_;
};

// bfloat16 products on the CPU's matrix units: C[M, N] (+ C if add) = A[M, K] @ B[K, N],
// A bfloat16 row-major with leading dimension lda, B bfloat16 in pairs of rows
// ([K / 2][ldb][2], K even), C float32 (ldc), summed in float32. A thread that multiplied
// calls release() before it leaves pyrnn's code, so that the units' configuration never
// outlives the call (the library that owns them tracks it per thread). ops.cpp registers
// the library's (oneDNN's brgemm, which torch carries) where it runs on the units (AMX).
struct MatrixGemm {
  void (*gemm)(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
               bool add, const uint16_t* A, const uint16_t* B, float* C);
  void (*release)();
  bool (*usable)();  // now (false while torch's oneDNN is switched off)
};
void register_matrix_gemm(const MatrixGemm* g);
// The registered product while the capability in use is "avx512_amx" and the product
// is usable, else nullptr.
const MatrixGemm* matrix_gemm();

// The bytes of one core's second-level cache (512 KB where the system does not say).
int64_t second_level_cache();

// The rows of a register block of the float32 product kernel in the AVX-512 copies
// (gemm.h, which takes at most 12): 12 on Intel CPUs, 8 on others, or the last
// set_gemm_rows (1 - 12). The same bits whatever it is.
int64_t gemm_rows();
bool set_gemm_rows(int64_t rows);
// Whether the CPU is an Intel one (its vendor string), for the choices measured there.
bool cpu_is_intel();
// Whether a float32 product outside the time loops (not a bfloat16 one), of M x N x K,
// runs on libtorch's BLAS rather than on pyrnn's kernel: a weight gradient C[M, N] = A^T B
// over K = T*B rows (matmul_tn) on sgemm_, an input projection or dX (matmul) on MKL's
// packed product where libtorch's BLAS is MKL (packed_blas(), blas.h); in fixed tiles of
// C of one sequential call each, the same bits for any number of threads. By default
// (mode -1): on Intel CPUs, where that BLAS is MKL at its best, from 2^24 flops
// (measured: dispatch.cpp); elsewhere never. set_blas_products(1) takes the BLAS for
// every shape, (0) never, (-1) the default. A build without the BLAS (PYRNN_NO_BLAS)
// never does.
bool blas_products(int64_t M, int64_t N, int64_t K, double from = double(1 << 24));
// Whether libtorch's BLAS has MKL's packed product (false in a build without the BLAS).
bool packed_blas();
// Whether a float32 input projection or dX over all rows (matmul) of M x N x K runs on
// MKL's packed product: packed_blas() and blas_products from 2^30 flops (dispatch.cpp).
bool projection_on_blas(int64_t M, int64_t N, int64_t K);
int blas_products_mode();
bool set_blas_products(int mode);

// The CPU capabilities (instruction sets) the loops are compiled for, and the one in use:
// the best this CPU supports, or the one the environment variable PYRNN_CPU_CAPABILITY
// names, or the last set_cpu_capability. Names: "default" (the build's baseline),
// "avx2" (x86-64-v3: AVX2, FMA), "avx512" (x86-64-v4: AVX-512 F, BW, DQ, VL),
// "avx512_bf16" (x86-64-v4 and AVX512-BF16: bfloat16 products in vdpbf16ps),
// "avx512_amx" (the avx512_bf16 copy, whose bfloat16 products run on the matrix units
// through the registered MatrixGemm).
// compiled_capabilities: those in this build; supported_capabilities: those of them this
// CPU can run (best last). set_cpu_capability returns false for a name not in the latter.
const char* compiled_capabilities();   // comma-separated
const char* supported_capabilities();  // comma-separated
const char* cpu_capability();
bool set_cpu_capability(const char* name);
// Why PYRNN_CPU_CAPABILITY was not followed ("" if it was, or is unset).
const char* cpu_capability_error();
// The instruction set of the build's baseline (what code outside the copies may use):
// "x86-64" unless PYRNN_MARCH raised it ("avx", "avx2", "avx512"), or "other".
const char* baseline_isa();

// The forward and BPTT of the cell at index `cell` of the registry, in the copy of the
// capability in use (dispatch.cpp).
void forward_loop(int cell, const ForwardArgs<float>& p);
void forward_loop(int cell, const ForwardArgs<double>& p);
void backward_loop(int cell, const BackwardArgs<float>& p);
void backward_loop(int cell, const BackwardArgs<double>& p);

// C[M, N] = A[M, K] @ op(Wm) (+ bias[N] on every row) for all rows at once (the
// products outside the time loop): op(Wm) = Wm^T for Wm [N, K] (transposed) or Wm for
// Wm [K, N]; A has leading dimension K, C leading dimension ldc; bias may be nullptr.
// float32 uses the packed kernel of gemm.h, float64 the BLAS.
void matmul(const float* A, int64_t M, int64_t K, const float* Wm, int64_t N, bool transposed,
            float* C, int64_t ldc, const float* bias);
void matmul(const double* A, int64_t M, int64_t K, const double* Wm, int64_t N, bool transposed,
            double* C, int64_t ldc, const double* bias);

// C[M, N + N2] = A^T @ [Bm | B2] for A [K, M], Bm [K, N] and B2 [K, N2] (the weight
// gradients: K = T*B rows; B2 may be nullptr with N2 = 0). Two weight gradients with the
// same left operand run as one product: A is read, and rounded for bfloat16 products,
// once. Every product here gives the same bits for any number of threads.
void matmul_tn(const float* A, int64_t M, int64_t K, const float* Bm, int64_t N,
               const float* B2, int64_t N2, float* C);
void matmul_tn(const double* A, int64_t M, int64_t K, const double* Bm, int64_t N,
               const double* B2, int64_t N2, double* C);

// out[N] = the sum of the M rows of A[M, N] (the bias gradients), in an order that
// depends on M alone.
void column_sums(const float* A, int64_t M, int64_t N, float* out);
void column_sums(const double* A, int64_t M, int64_t N, double* out);

}  // namespace pyrnn::cpu
