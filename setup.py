"""Build script for nuwa-kernels: the op package, its C++ CPU kernels and (optionally) CUDA kernels.

Install with ``pip install --no-build-isolation -e .`` against the torch you already have (build
isolation would pull an unpinned, multi-GB CUDA torch into the build environment).

Knobs (environment variables):

* ``NUWA_SKIP_EXT=1``: build no extension at all (pure Python; the reference and Triton backends).
* ``NUWA_SKIP_CUDA=1``: build the C++ CPU kernels only, even with a CUDA toolkit and a CUDA torch.
* ``NUWA_CUDA_ARCHS``: ``;``-separated compute capabilities for the CUDA kernels (default ``8.0;9.0``).
* ``NUWA_CPU_ARCH``: value for ``-march`` (default ``native``; use e.g. ``x86-64-v3`` for portable builds).
* ``MAX_JOBS``: parallel compile jobs (read by torch's ninja build).

The CUDA kernels are built when torch is a CUDA build and nvcc is found (``CUDA_HOME``), unless
``NUWA_SKIP_CUDA`` is set. Without a C++ compiler the package installs without ``nuwa_kernels._C``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("NUWA_CUDA_ARCHS", "8.0;9.0").split(";") if a.strip()]
    flags = []
    for arch in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _extensions():
    if _flag("NUWA_SKIP_EXT"):
        print("nuwa-kernels: NUWA_SKIP_EXT set, building no extension", file=sys.stderr)
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("nuwa-kernels: no C++ compiler found, building no extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    cpp_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if not cpp_sources:
        return [], {}
    march = os.environ.get("NUWA_CPU_ARCH", "native")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", f"-march={march}", "-ffp-contract=fast"]
    common = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    build_cuda = (
        not _flag("NUWA_SKIP_CUDA") and torch.version.cuda is not None and CUDA_HOME is not None
    )
    if build_cuda:
        cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            name="nuwa_kernels._C",
            sources=cpp_sources + cuda_sources,
            define_macros=[("NUWA_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + _cuda_arch_flags(),
            },
            **common,
        )
    else:
        ext = CppExtension(name="nuwa_kernels._C", sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["nuwa_kernels", "nuwa_kernels.*", "nuwa", "nuwa.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
