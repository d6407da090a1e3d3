// Shared helpers for the cell headers: host/device qualifiers and scalar activations.
// Torch-free, so that nvcc and a plain C++ compiler can both include it.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define PYRNN_HD __host__ __device__ __forceinline__
#else
#define PYRNN_HD inline
#endif

namespace pyrnn {

// Activation ids used by the Elman cell.
enum class Act { kTanh = 0, kRelu = 1 };

// Storage <-> arithmetic conversions. Cells read every stored value through load<A>()
// and write through store<T>(), so that a storage type without implicit conversions
// (the CUDA half types) only needs overloads of these two.
template <typename A, typename T>
PYRNN_HD A load(T v) {
  return static_cast<A>(v);
}
template <typename T, typename A>
PYRNN_HD T store(A v) {
  return static_cast<T>(v);
}

template <typename A>
PYRNN_HD A sigmoid(A x) {
  return A(1) / (A(1) + exp(-x));
}

template <typename A>
PYRNN_HD A clamp_abs(A v, A c) {
  // c <= 0 means "no clipping".
  if (c > A(0)) {
    v = v > c ? c : v;
    v = v < -c ? -c : v;
  }
  return v;
}

}  // namespace pyrnn
