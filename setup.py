"""Build script: compiles fairkernels._C from csrc/ when torch is importable.

pip install --no-build-isolation .   -> torch from the environment, extension built here
pip install .                        -> no torch in the isolated build env: pure-Python wheel;
                                        the extension is compiled on first use (fairkernels/_extension.py)
FAIRKERNELS_CUDA=0/1 forces the CUDA sources off/on (default: on when torch has CUDA and CUDA_HOME exists).
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package so a wheel built without torch can JIT-compile it later."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fairkernels", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), target)


def extension_modules():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fairkernels: torch not importable at build time; building a pure-Python package "
              "(the extension is compiled on first use)")
        return [], {}

    flag = os.environ.get("FAIRKERNELS_CUDA")
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) if flag is None else flag == "1"
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/ops.cpp"]
    # -g0: no debug info (Python's default CFLAGS carry -g, which triples the compile time of the
    # torch headers and the size of the .so). -Wno-psabi: GCC notes at every use of the inline Vec4
    # helpers (csrc/cpu/common.h) that 32-byte vectors pass differently without AVX; no call
    # crosses objects built differently.
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-Wno-psabi", "-std=c++17"]
    define_macros = []
    if with_cuda and glob.glob("csrc/cuda/*.cu"):
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FAIRKERNELS_WITH_CUDA", "1"))
        nvcc = ["-O3", "--use_fast_math", "-std=c++17",
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = CUDAExtension("fairkernels._C", sources, define_macros=define_macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("fairkernels._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
