"""Install and packaging: the build script's errors, CUDA toolkit discovery, the `make` stamp, the
fallback warning, the environment report, and what a wheel contains. Fast (no extension build)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_setup_module():
    """setup.py's helpers, imported without running the build (it only builds as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("nuwa_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUWA_")}
    env.update(extra)
    return env


def _run_setup_py(env, *, hide_torch: bool) -> subprocess.CompletedProcess:
    """Run setup.py as pip does (``__main__``, ``egg_info``) in a subprocess; optionally hide torch."""
    code = (
        ("import sys; sys.modules['torch'] = None\n" if hide_torch else "")
        + "import runpy, sys\nsys.argv = ['setup.py', 'egg_info', '--egg-base', sys.argv[1]]\n"
        + "runpy.run_path('setup.py', run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, os.environ.get("TMPDIR", "/tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


# --- setup.py ------------------------------------------------------------------------------------------


def test_setup_without_torch_says_install_torch_first():
    res = _run_setup_py(_clean_env(), hide_torch=True)
    assert res.returncode != 0
    err = res.stderr
    assert "ModuleNotFoundError" not in err, err
    assert "Install torch first" in err, err
    assert "download.pytorch.org/whl/cpu" in err and "torch==" in err, err
    assert "--no-build-isolation" in err and "NUWA_SKIP_EXT=1" in err, err


def test_setup_without_compiler_fails_loudly():
    """No compiler is an error (not a silent pure-Python install), unless NUWA_SKIP_EXT=1 says so."""
    res = _run_setup_py(_clean_env(CXX="/nonexistent/c++"), hide_torch=True)
    assert res.returncode != 0
    assert "no C++ compiler" in res.stderr and "NUWA_SKIP_EXT=1" in res.stderr, res.stderr


def test_cuda_arch_flags_ship_ptx_for_the_newest_arch(monkeypatch):
    setup_mod = _load_setup_module()
    monkeypatch.setenv("NUWA_CUDA_ARCHS", "9.0;8.0")
    flags = setup_mod.cuda_arch_flags(setup_mod._cuda_archs())
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags
    assert flags[-1] == "-gencode=arch=compute_90,code=compute_90"  # PTX: JIT on newer GPUs
    assert sum("code=compute_" in f for f in flags) == 1
    monkeypatch.setenv("NUWA_CUDA_ARCHS", "sm90")
    with pytest.raises(SystemExit, match="NUWA_CUDA_ARCHS"):
        setup_mod._cuda_archs()


def _fake_toolkit(tmp_path: Path) -> Path:
    """A toolkit folder (bin/nvcc, include/cuda_runtime_api.h) and, elsewhere, a wrapper ``nvcc`` script
    that prints what the real nvcc's ``--dryrun`` prints (``#$ TOP=<toolkit>/bin/..``)."""
    real = tmp_path / "cuda-13.0"
    (real / "bin").mkdir(parents=True)
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime_api.h").write_text("")
    (real / "bin" / "nvcc").write_text("#!/bin/sh\necho '#$ _HERE_=%s/bin' >&2\necho '#$ TOP=%s/bin/..' >&2\n" % (real, real))
    wrapper_dir = tmp_path / "wrapper" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    for f in (real / "bin" / "nvcc", wrapper):
        f.chmod(f.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return real


def test_cuda_home_found_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    setup_mod = _load_setup_module()
    real = _fake_toolkit(tmp_path)
    wrapper = tmp_path / "wrapper" / "bin" / "nvcc"
    assert not setup_mod._toolkit_ok(str(wrapper.parent.parent))  # what torch would guess from the PATH
    assert setup_mod._toolkit_from_nvcc(str(wrapper)) == str(real)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    home, how = setup_mod.find_cuda_home()
    assert home == str(real) and str(wrapper) in how
    # A CUDA_HOME that is not a toolkit (e.g. the wrapper's folder) fails, saying what to set.
    monkeypatch.setenv("CUDA_HOME", str(wrapper.parent.parent))
    with pytest.raises(SystemExit, match="CUDA_HOME=.* is not a CUDA toolkit folder"):
        setup_mod.find_cuda_home()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on the PATH")
def test_cuda_home_from_the_real_nvcc(tmp_path):
    setup_mod = _load_setup_module()
    nvcc = shutil.which("nvcc")
    home = setup_mod._toolkit_from_nvcc(nvcc)
    assert home is not None and setup_mod._toolkit_ok(home), home
    wrapper = tmp_path / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    wrapper.chmod(0o755)
    assert setup_mod._toolkit_from_nvcc(str(wrapper)) == home


def test_wheel_contents_without_the_extension(tmp_path):
    """A NUWA_SKIP_EXT=1 wheel (built from a copy): py.typed, __main__, LICENSE, the build record."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py")
    for pkg in ("nuwa_kernels", "nuwa"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index",
         "-w", str(tmp_path / "dist"), str(src)],
        env=_clean_env(NUWA_SKIP_EXT="1"), capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    import nuwa_kernels

    assert wheel.name.startswith(f"nuwa_kernels-{nuwa_kernels.__version__}-")  # one version, from __init__
    names = zipfile.ZipFile(wheel).namelist()
    assert "nuwa_kernels/py.typed" in names
    assert "nuwa_kernels/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    assert "nuwa_kernels/_build_info.py" in names
    assert not any("_C" in n and n.endswith(".so") for n in names)
    info = zipfile.ZipFile(wheel).read("nuwa_kernels/_build_info.py").decode()
    assert "'extension': False" in info
    # The package itself then says why there is no extension (even beside a leftover _C*.so).
    for so in (ROOT / "nuwa_kernels").glob("_C*.so"):
        shutil.copy(so, src / "nuwa_kernels" / so.name)
    code = "import nuwa_kernels; from nuwa_kernels import _extension as e; print(e.loaded(), e.LOAD_ERROR)"
    res = subprocess.run([sys.executable, "-c", code], cwd=src, env=_clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("False ") and "NUWA_SKIP_EXT=1" in res.stdout, res.stdout


# --- the fallback warning and the environment report ----------------------------------------------------


def test_auto_warns_once_when_the_extension_is_missing():
    script = textwrap.dedent(
        """
        import warnings, torch, nuwa_kernels as nk
        from nuwa_kernels._extension import ExtensionFallbackWarning
        q = torch.randn(1, 2, 3, 4, 2, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nk.nearby_attention(q, q, q, backend="reference")   # explicit: no warning
            assert not [w for w in caught if w.category is ExtensionFallbackWarning]
            for _ in range(3):
                nk.nearby_attention(q, q, q)                     # auto on CPU -> reference
        hits = [str(w.message) for w in caught if w.category is ExtensionFallbackWarning]
        assert len(hits) == 1, hits
        print(hits[0])
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], env=_clean_env(NUWA_KERNELS_NO_EXT="1"),
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    msg = res.stdout
    assert "reference" in msg and "NUWA_KERNELS_NO_EXT" in msg and "Fix: unset NUWA_KERNELS_NO_EXT" in msg, msg


def test_no_fallback_warning_when_the_extension_is_loaded():
    from nuwa_kernels import _extension
    from nuwa_kernels.backends import select_backend
    from nuwa_kernels.window import make_window_spec

    if not _extension.loaded():
        pytest.skip(f"needs nuwa_kernels._C: {_extension.LOAD_ERROR}")
    q = torch.zeros(1, 2, 3, 4, 2, 8)
    spec = make_window_spec(q.shape[1:4], q.shape[1:4], (3, 3, 3), False, "truncate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend("auto", q, q, q, spec).NAME == "cpu"


def test_env_report_cli():
    res = subprocess.run(
        [sys.executable, "-m", "nuwa_kernels"], env=_clean_env(), capture_output=True, text=True,
        timeout=120, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for word in ("nuwa-kernels", "python", "torch", "triton", "numpy", "nuwa_kernels._C", "backends on cpu"):
        assert word in out, out
    for backend in ("reference", "cpu", "cuda", "triton"):
        assert f"\n  {backend} " in out, out


def test_env_report_json(capsys):
    from nuwa_kernels import _extension
    from nuwa_kernels.__main__ import main

    assert main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert report["extension"]["loaded"] == _extension.loaded()
    assert set(report["backends"]["cpu"]) == {"reference", "cpu", "cuda", "triton"}
    assert report["backends"]["cpu"]["reference"]["ok"] is True
    for res in report["backends"]["cpu"].values():
        assert res["ok"] or res["reason"]  # every unavailable backend says why
    if _extension.loaded() and report["extension"]["build"]:
        assert "cuda_archs" in report["extension"]["build"]


# --- make: the setup stamp ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_test_and_bench_set_up_only_when_inputs_changed(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "requirements").mkdir()
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / ".venv").mkdir()
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    deps = ["scripts/setup.sh", "setup.py", "pyproject.toml", "requirements/dev.txt", "csrc/ops.cpp",
            "csrc/window.h", "csrc/cpu/k.cpp"]
    for dep in deps:
        (tmp_path / dep).write_text("")
    stamp = tmp_path / ".venv" / ".nuwa-setup.stamp"

    def plan(target):
        res = subprocess.run(["make", "-n", "-C", str(tmp_path), target], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert "scripts/setup.sh" in plan("test")  # no stamp yet: set up
    old = time.time() - 1000
    for dep in deps:
        os.utime(tmp_path / dep, (old, old))
    stamp.write_text("")
    for target in ("test", "bench"):
        out = plan(target)
        assert "scripts/setup.sh" not in out, out  # nothing changed: straight to the command
    assert "pytest tests" in plan("test") and "benchmarks.run --quick" in plan("bench")
    assert "scripts/setup.sh" in plan("setup")  # `make setup` always checks
    for dep in ("csrc/cpu/k.cpp", "csrc/window.h", "requirements/dev.txt", "setup.py"):
        os.utime(tmp_path / dep, None)
        assert "scripts/setup.sh" in plan("test"), dep  # a C++ (or setup) change rebuilds
        os.utime(tmp_path / dep, (old, old))


def test_setup_sh_writes_the_stamp_and_installs_the_cpu_torch():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    assert ".venv/.nuwa-setup.stamp" in text and 'touch "$STAMP"' in text
    assert "download.pytorch.org/whl/cpu" in text and "NUWA_TORCH_INDEX_URL" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")]).returncode == 0


# --- gpu_check.sh: the time caps, without a GPU ------------------------------------------------------------


@pytest.mark.skipif(shutil.which("timeout") is None, reason="no coreutils timeout")
def test_gpu_check_writes_a_summary_and_respects_its_budget(tmp_path):
    out = tmp_path / "out"
    env = _clean_env(OUT=str(out), PYTHON=sys.executable, NUWA_GPU_CHECK_BUDGET="12")
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )
    summary = (out / "summary.md").read_text()
    for step in ("env", "build", "report", "tests", "bench-tiny", "bench-quick"):
        assert f"| {step} | skipped (no time left)" in summary, summary
    assert res.returncode == 1  # nothing built or tested: not a pass


# --- files ------------------------------------------------------------------------------------------------


def test_license_typed_marker_changelog_and_pins():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "nuwa-kernels contributors" in license_text
    assert (ROOT / "nuwa_kernels" / "py.typed").exists()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()
    assert "## 0.2.0 (unreleased)" in (ROOT / "CHANGELOG.md").read_text()
    assert "numpy<2.4" in (ROOT / "requirements" / "dev.txt").read_text()  # triton 3.6's interpreter
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command
