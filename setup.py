"""Build script for nuwa-kernels: the op package, its C++ CPU kernels and (optionally) CUDA kernels.

Install torch first, then install with ``pip install --no-build-isolation -e .`` against that torch
(build isolation would pull an unpinned, multi-GB CUDA torch into the build environment).

Knobs (environment variables):

* ``NUWA_SKIP_EXT=1``: build no extension at all (pure Python; the reference and Triton backends).
  Without it, a missing C++ compiler is an error (never a silent pure-Python install).
* ``NUWA_SKIP_CUDA=1``: build the C++ CPU kernels only, even with a CUDA torch.
* ``NUWA_CUDA_ARCHS``: ``;``-separated compute capabilities for the CUDA kernels (default ``8.0;9.0``);
  machine code (``sm_XX``) for each, plus PTX (``compute_XX``) for the newest one so that the kernels
  JIT-compile on newer GPUs.
* ``CUDA_HOME``: the CUDA toolkit folder (with ``bin/nvcc`` and ``include/cuda_runtime_api.h``). When
  unset, it is found from the ``nvcc`` on the PATH, even when that ``nvcc`` is a wrapper script (the
  toolkit's own folder is read from ``nvcc --dryrun``).
* ``NUWA_CPU_ARCH``: value for ``-march`` (default ``native``; use e.g. ``x86-64-v3`` for portable builds).
* ``MAX_JOBS``: parallel compile jobs (read by torch's ninja build).

The CUDA kernels are built when torch is a CUDA build, unless ``NUWA_SKIP_CUDA`` is set; a CUDA torch
without a CUDA toolkit is an error that says what to set. What was built (CUDA or not, the archs, the
torch it was built against) is recorded in ``nuwa_kernels/_build_info.py`` and shown by
``python -m nuwa_kernels``.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_NAME = "_build_info.py"
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _fail(message: str) -> None:
    """Stop the build with ``message`` (pip shows a failed build's output even with ``-q``)."""
    bar = "=" * 100
    raise SystemExit(f"\n{bar}\nnuwa-kernels: cannot build.\n{message.strip()}\n{bar}\n")


TORCH_MISSING = """
{what}
Install torch first, then install nuwa-kernels against it without build isolation:

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # CPU-only build
    pip install torch==2.13.0                                                    # CUDA build (Linux)
    pip install --no-build-isolation -e .

(`make setup` / scripts/setup.sh does all of this in .venv.){isolation}
To install without the C++ extension (reference and Triton backends only), set NUWA_SKIP_EXT=1.
"""

ISOLATION_HINT = """
This build runs in an isolated build environment (pip's default), which never sees your torch:
pass --no-build-isolation."""


# --- CUDA toolkit -------------------------------------------------------------------------------------


def _toolkit_ok(home: str) -> bool:
    """Whether ``home`` looks like a CUDA toolkit folder that torch's build can use as CUDA_HOME."""
    return os.path.isfile(os.path.join(home, "bin", "nvcc")) and (
        os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))
        or bool(glob.glob(os.path.join(home, "targets", "*", "include", "cuda_runtime_api.h")))
    )


def _toolkit_from_nvcc(nvcc: str) -> str | None:
    """The toolkit folder behind ``nvcc``: its symlink target's parent, else ``TOP`` from ``nvcc --dryrun``
    (which names the real toolkit even when ``nvcc`` is a wrapper script that execs it)."""
    real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _toolkit_ok(real):
        return real
    try:
        res = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        text = res.stdout + res.stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for key in ("TOP", "_HERE_"):
        m = re.search(rf"^#\$ {key}=(.+)$", text, re.M)
        if m:
            path = m.group(1).strip().strip('"')
            home = os.path.normpath(os.path.join(path, "..") if key == "_HERE_" else path)
            if _toolkit_ok(home):
                return home
    return None


def find_cuda_home() -> tuple[str | None, str]:
    """``(folder, how it was found)`` of the CUDA toolkit, or ``(None, what was tried)``.

    Raises SystemExit when ``CUDA_HOME``/``CUDA_PATH`` is set to a folder that is not a toolkit.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if not _toolkit_ok(home):
                _fail(
                    f"{var}={home} is not a CUDA toolkit folder (it needs bin/nvcc and "
                    "include/cuda_runtime_api.h).\nSet CUDA_HOME to the toolkit, e.g. the folder that "
                    "`nvcc --dryrun -x cu -c /dev/null` prints as TOP, or set NUWA_SKIP_CUDA=1 to build "
                    "the CPU kernels only."
                )
            return home, f"${var}"
    tried = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_from_nvcc(nvcc)
        if home:
            return home, f"from {nvcc}"
        tried.append(f"{nvcc} (no toolkit found behind it)")
    else:
        tried.append("no nvcc on the PATH")
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _toolkit_ok(home):
            return home, "the default location"
        tried.append(home)
    return None, "; ".join(tried)


def _cuda_archs() -> list[str]:
    archs = []
    for arch in os.environ.get("NUWA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).replace(",", ";").split(";"):
        arch = arch.strip().upper().replace("+PTX", "")
        if not arch:
            continue
        if not re.fullmatch(r"\d+\.\d+[AF]?", arch):
            _fail(f"NUWA_CUDA_ARCHS: {arch!r} is not a compute capability like 8.0 or 9.0 (';'-separated)")
        archs.append(arch.lower())
    if not archs:
        _fail("NUWA_CUDA_ARCHS is empty")
    return sorted(set(archs), key=lambda a: (float(re.sub(r"[af]$", "", a)), a))


def cuda_arch_flags(archs: list[str]) -> list[str]:
    """``-gencode`` flags: machine code for every arch, plus PTX for the newest (JIT on newer GPUs)."""
    flags = []
    for arch in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    newest = archs[-1].replace(".", "")
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


# --- build info -----------------------------------------------------------------------------------------


def _write_build_info(info: dict, folders) -> None:
    text = (
        '"""What setup.py built (generated at build time; do not edit; read by python -m nuwa_kernels)."""\n\n'
        f"BUILD = {info!r}\n"
    )
    for folder in dict.fromkeys(folders):
        if not os.path.isdir(folder):
            continue
        path = os.path.join(folder, BUILD_INFO_NAME)
        try:
            with open(path) as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        with open(path, "w") as f:
            f.write(text)


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    words = shlex.split(cxx) or ["c++"]
    if shutil.which(words[0]) is None:
        return f"no C++ compiler: {words[0]!r} (from CXX, default c++) is not on the PATH"
    return None


# --- the extension --------------------------------------------------------------------------------------


def _extensions():
    pkg_dir = os.path.join(ROOT, "nuwa_kernels")
    if _flag("NUWA_SKIP_EXT"):
        print("nuwa-kernels: NUWA_SKIP_EXT set, building no extension", file=sys.stderr)
        _write_build_info({"extension": False, "reason": "NUWA_SKIP_EXT=1 at install"}, [pkg_dir])
        return [], {}
    why = _compiler_missing()
    if why:
        _fail(
            f"{why}.\nThe C++ extension nuwa_kernels._C (the fused `cpu` and `cuda` backends) needs one: "
            "install a C++17 compiler (e.g. `apt-get install g++`) or set CXX.\nTo install without the "
            "extension on purpose (reference and Triton backends only; `auto` then falls back to the "
            "slow reference on CPU), set NUWA_SKIP_EXT=1."
        )
    try:
        import torch
    except ImportError:
        isolated = any("pip-build-env" in p for p in sys.path)
        what = (
            "torch cannot be imported in pip's isolated build environment."
            if isolated
            else f"torch is not installed in the Python that runs this build ({sys.executable})."
        )
        _fail(TORCH_MISSING.format(what=what, isolation=ISOLATION_HINT if isolated else ""))

    build_cuda = torch.version.cuda is not None and not _flag("NUWA_SKIP_CUDA")
    cuda_home, archs = None, []
    if build_cuda:
        cuda_home, how = find_cuda_home()
        if cuda_home is None:
            _fail(
                f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, but no CUDA toolkit was "
                f"found ({how}).\nSet CUDA_HOME to the toolkit folder (the one with bin/nvcc and "
                "include/cuda_runtime_api.h, e.g. CUDA_HOME=/usr/local/cuda-13.0), or set NUWA_SKIP_CUDA=1 "
                "to build the CPU kernels only."
            )
        # torch.utils.cpp_extension reads CUDA_HOME when it is first imported (a wrapper nvcc on the
        # PATH would make it guess the wrapper's folder): set it first, and patch it if already imported.
        os.environ["CUDA_HOME"] = cuda_home
        if "torch.utils.cpp_extension" in sys.modules:
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = cuda_home
        print(f"nuwa-kernels: CUDA_HOME={cuda_home} ({how})", file=sys.stderr)
        archs = _cuda_archs()

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    cpp_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if not cpp_sources:
        _fail("no C++ sources under csrc/ (an incomplete checkout?)")
    march = os.environ.get("NUWA_CPU_ARCH", "native")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", f"-march={march}", "-ffp-contract=fast"]
    common = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    info = {
        "extension": True,
        "torch": torch.__version__,
        "cpu_arch": march,
        "cuda": build_cuda,
        "cuda_archs": archs,
        "ptx_arch": archs[-1] if archs else None,
        "cuda_home": cuda_home,
        "torch_cuda": torch.version.cuda if build_cuda else None,
    }
    if build_cuda:
        cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            name="nuwa_kernels._C",
            sources=cpp_sources + cuda_sources,
            define_macros=[("NUWA_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + cuda_arch_flags(archs),
            },
            **common,
        )
    else:
        ext = CppExtension(name="nuwa_kernels._C", sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common)

    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class build_ext(base):  # noqa: N801  (setuptools command name)
        """torch's BuildExtension that also records what it builds next to the built module."""

        def run(self):
            out_dir = os.path.dirname(self.get_ext_fullpath("nuwa_kernels._C"))
            os.makedirs(out_dir, exist_ok=True)
            _write_build_info(info, [pkg_dir, out_dir])
            super().run()

    return [ext], {"build_ext": build_ext}


if __name__ == "__main__":  # (pip and setuptools run this file as __main__; tests import its helpers)
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["nuwa_kernels", "nuwa_kernels.*", "nuwa", "nuwa.*"]),
        package_data={"nuwa_kernels": ["py.typed"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
