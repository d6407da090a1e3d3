// The CPU time loops, compiled once per cell and dtype. This translation unit includes
// no torch header, so it compiles in seconds. On x86-64 with GCC each loop is also
// cloned for x86-64-v3 (AVX2, FMA), picked at load time by the CPU it runs on.
#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "../cells/rnn.h"
#include "loops_impl.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYRNN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define PYRNN_CLONES __attribute__((flatten))
#endif

namespace pyrnn::cpu {

#define PYRNN_DEFINE_LOOPS(CELL, T)                                     \
  template <>                                                           \
  PYRNN_CLONES void forward_loop<CELL, T, T>(const LoopArgs<T>& p) {    \
    forward_steps<CELL, T, T>(p);                                       \
  }                                                                     \
  template <>                                                           \
  PYRNN_CLONES void backward_loop<CELL, T, T>(const LoopArgs<T>& p) {   \
    backward_steps<CELL, T, T>(p);                                      \
  }

using RnnTanh = RnnCell<Act::kTanh>;
using RnnRelu = RnnCell<Act::kRelu>;

PYRNN_DEFINE_LOOPS(RnnTanh, float)
PYRNN_DEFINE_LOOPS(RnnTanh, double)
PYRNN_DEFINE_LOOPS(RnnRelu, float)
PYRNN_DEFINE_LOOPS(RnnRelu, double)
PYRNN_DEFINE_LOOPS(LstmCell, float)
PYRNN_DEFINE_LOOPS(LstmCell, double)
PYRNN_DEFINE_LOOPS(GruCell, float)
PYRNN_DEFINE_LOOPS(GruCell, double)

}  // namespace pyrnn::cpu
