"""The build of pyrnn._C, described once: sources, compiler flags, definitions and the
probes that choose them. setup.py imports this file; CMakeLists.txt runs it
(`python build_config.py --cmake LIBTORCH_CPU`) and includes the CMake it prints, so the
two builds cannot drift apart. Torch-free (the probe opens libtorch_cpu by path).

Environment: PYRNN_MARCH=<value> adds -march=<value> to the whole build (default none:
the loops are compiled once more for each instruction set they dispatch to at run time).
"""
import ctypes
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _lines(path):
    with open(os.path.join(HERE, path)) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


# The C++ sources, relative to the repository root (csrc/sources.txt; kernels_<isa>.cpp
# are the copies of the loops for each instruction set, see csrc/cpu/kernels_impl.h).
SOURCES = _lines("csrc/sources.txt")
# Added when the CUDA kernels are built.
CUDA_SOURCES = ["csrc/cuda/kernels.cu", "csrc/cuda_ops.cpp"]
# nvcc's flags (also read by .ci/check_cuda.sh).
NVCC_FLAGS = " ".join(_lines("csrc/cuda/nvcc.flags")).split()
# The C++ standard, and flags for every C++ file (OpenMP comes on top: -fopenmp for
# setup.py, OpenMP::OpenMP_CXX for CMake).
CXX_STANDARD = 20
# -g0: no debug information (Python's CFLAGS, which setup.py's compile starts from,
# carry -g; CMake's Release build has none), which takes a third off the compile of
# ops.cpp (78 s -> 48 s on one core).
CXX_FLAGS = ["-O3", "-g0", "-Wno-psabi", "-fvisibility=hidden"]


def march_flags(environ=os.environ):
    """-march for the whole build from PYRNN_MARCH (none by default)."""
    march = environ.get("PYRNN_MARCH", "").strip()
    return [] if march.lower() in ("", "none") else [f"-march={march}"]


def definitions(libtorch_cpu, cuda=False):
    """Preprocessor definitions: PYRNN_NO_BLAS when libtorch_cpu does not export the BLAS
    entry the float64 loops call (dgemm_); PYRNN_WITH_CUDA with the CUDA kernels."""
    try:
        handle = ctypes.CDLL(libtorch_cpu)
        blas = hasattr(handle, "dgemm_")
    except OSError:
        blas = False
    return ([] if blas else ["PYRNN_NO_BLAS"]) + (["PYRNN_WITH_CUDA"] if cuda else [])


def _cmake_list(values):
    return '"' + ";".join(values) + '"'


def cmake(libtorch_cpu):
    """The CMake statements that CMakeLists.txt includes."""
    return "\n".join([
        f"set(PYRNN_SOURCES {_cmake_list(SOURCES)})",
        f"set(PYRNN_CUDA_SOURCES {_cmake_list(CUDA_SOURCES)})",
        f"set(PYRNN_CXX_FLAGS {_cmake_list(CXX_FLAGS + march_flags())})",
        f"set(PYRNN_CXX_STANDARD {CXX_STANDARD})",
        f"set(PYRNN_NVCC_FLAGS {_cmake_list(f for f in NVCC_FLAGS if not f.startswith('-std='))})",
        f"set(PYRNN_DEFINITIONS {_cmake_list(definitions(libtorch_cpu))})",
        "",
    ])


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--cmake":
        sys.exit("usage: python build_config.py --cmake LIBTORCH_CPU")
    sys.stdout.write(cmake(sys.argv[2]))
