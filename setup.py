"""Build pyrnn's compiled extension with torch's cpp_extension.

The CUDA kernels are compiled when the installed torch was built with CUDA and nvcc is
found (torch.version.cuda and CUDA_HOME); whether a GPU is visible does not matter.
PYRNN_CUDA=1 forces the CUDA build on, PYRNN_CUDA=0 forces a CPU-only build.
Install with `pip install --no-build-isolation .` so that the build uses the torch you
already have.
"""
import os
import sys

from setuptools import find_packages, setup
import torch
from torch.utils import cpp_extension


def want_cuda():
    flag = os.environ.get("PYRNN_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    found = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "on", "true", "yes"):
        if not found:
            raise RuntimeError(
                "PYRNN_CUDA=1: expected a torch built with CUDA and nvcc (CUDA_HOME), got "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
            )
        return True
    return found


here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import build_config  # noqa: E402  (the build's sources, flags and probes, shared with CMake)

sources = list(build_config.SOURCES)
cxx_flags = build_config.CXX_FLAGS + ["-fopenmp"] + build_config.march_flags()
libtorch_cpu = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
cuda = want_cuda()
macros = [(d, None) for d in build_config.definitions(libtorch_cpu, cuda)]

if cuda:
    sources += build_config.CUDA_SOURCES
    # (torch's CUDAExtension adds the same half-conversion macros, and the architectures
    # from TORCH_CUDA_ARCH_LIST or the visible GPUs)
    ext = cpp_extension.CUDAExtension(
        "pyrnn._C", sources, define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": build_config.NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = cpp_extension.CppExtension(
        "pyrnn._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    name="pyrnn",
    version="0.1.0",
    description="Fused RNN, LSTM and GRU kernels for PyTorch with gradient-flow instrumentation",
    long_description=open(os.path.join(here, "README.md")).read() if os.path.exists(
        os.path.join(here, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pyrnn", "pyrnn.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"plot": ["matplotlib"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["pyrnn=pyrnn.__main__:main"]},
)
