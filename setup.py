"""Build of `fused_hourglass._C`: CPU kernels always, CUDA kernels when a CUDA PyTorch and nvcc are present.

Environment:
  FH_FORCE_CUDA=1        build the CUDA kernels even if autodetection says no (fails loudly without nvcc)
  FH_SKIP_CUDA_BUILD=1   CPU kernels only
  TORCH_CUDA_ARCH_LIST   archs to compile for; default "8.0;9.0" when no GPU is visible
  FH_PTXAS_VERBOSE=1     pass -Xptxas -v so register use and spills are printed (CI checks them)
Sources are globbed: csrc/**/*.cpp for every build, csrc/**/cuda/*.cu for the CUDA one.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """CUDA_HOME as set, else the toolkit behind nvcc. /usr/local/bin/nvcc may be a wrapper script, which
    makes PyTorch's own guess (its parent's parent, /usr/local) wrong, so prefer /usr/local/cuda."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda(cuda_home):
    if os.environ.get("FH_SKIP_CUDA_BUILD") == "1":
        return False
    if os.environ.get("FH_FORCE_CUDA") == "1":
        if cuda_home is None:
            sys.exit("FH_FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a directory with bin/nvcc")
        return True
    import torch

    return torch.version.cuda is not None and cuda_home is not None


_cuda_home = _find_cuda_home()
WITH_CUDA = _want_cuda(_cuda_home)
if WITH_CUDA:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = _cuda_home
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvidia_include_dirs():
    """Headers the system toolkit may lack (e.g. cusparse.h) ship in the pip `nvidia` packages."""
    dirs = []
    for entry in sys.path:
        for sub in ("cu13", "cu12"):
            d = os.path.join(entry, "nvidia", sub, "include")
            if os.path.isdir(d):
                dirs.append(d)
    return dirs[:1]


def _extension():
    csrc = os.path.join("csrc")
    cpp_sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    cu_sources = sorted(glob.glob(os.path.join(csrc, "**", "cuda", "*.cu"), recursive=True))
    # -fopenmp: at::parallel_for is an inline OpenMP loop in the headers; without it every op runs on one thread.
    # -ffp-contract=fast: a·b + c becomes one FMA in the x86-64-v3 clones of the hot loops (see cpu_utils.h).
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=fast"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not WITH_CUDA:
        return CppExtension("fused_hourglass._C", cpp_sources, include_dirs=include_dirs,
                            define_macros=define_macros, extra_compile_args={"cxx": cxx_flags},
                            py_limited_api=True)
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("FH_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    define_macros.append(("FH_WITH_CUDA", None))
    return CUDAExtension("fused_hourglass._C", cpp_sources + cu_sources,
                         include_dirs=include_dirs + _nvidia_include_dirs(), define_macros=define_macros,
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, py_limited_api=True)


def _write_build_info():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""
    import torch

    path = os.path.join(ROOT, "fused_hourglass", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"WITH_CUDA = {WITH_CUDA!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")


_write_build_info()

setup(
    packages=find_packages(include=["fused_hourglass", "fused_hourglass.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
