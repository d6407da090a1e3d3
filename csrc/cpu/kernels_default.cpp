// The CPU loops for the build's baseline instruction set (x86-64 unless PYRNN_MARCH
// says otherwise): the copy every CPU can run.
#define PYRNN_ISA pyrnn_isa_default
#include "kernels_impl.h"
