"""``python -m nuwa_kernels``: an environment report for bug reports and first installs.

Prints the versions (Python, torch, CUDA, Triton, numpy), whether ``nuwa_kernels._C`` is built and
loaded (and with which CUDA archs), the GPUs, and which backends can run on CPU (and CUDA when present),
with the reason when one cannot. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Any, Dict


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (a broken optional package must not break the report)
        return None if isinstance(exc, ImportError) else f"import failed: {exc}"
    return getattr(mod, "__version__", "unknown")


def collect() -> Dict[str, Any]:
    """The report as a dict (what ``--json`` prints)."""
    import torch

    import nuwa_kernels as nk
    from nuwa_kernels import _extension

    report: Dict[str, Any] = {
        "nuwa_kernels": getattr(nk, "__version__", "unknown"),
        "location": os.path.dirname(os.path.abspath(nk.__file__)),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    info = dict(_extension.BUILD_INFO)
    ext: Dict[str, Any] = {"loaded": _extension.loaded(), "build": info}
    if not _extension.loaded():
        ext["error"] = _extension.LOAD_ERROR
        ext["fix"] = _extension.LOAD_FIX
    else:
        try:
            ext["cuda_kernels"] = bool(
                torch._C._dispatch_has_kernel_for_dispatch_key("nuwa_kernels::na3d_fwd", "CUDA")
            )
        except RuntimeError:
            ext["cuda_kernels"] = False
        from nuwa_kernels.backends import cpu

        ext["cpu_isa"] = cpu.kernel_isa()
    report["extension"] = ext
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append({"name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    report["gpus"] = gpus
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report["backends"] = {}
    for device in devices:
        try:
            report["backends"][device] = {
                name: {"ok": ok, "reason": why} for name, (ok, why) in nk.available_backends(device).items()
            }
        except Exception as exc:  # noqa: BLE001
            report["backends"][device] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def _archs_line(info: Dict[str, Any]) -> str:
    if not info.get("cuda"):
        return "no"
    archs = ", ".join(f"sm_{a.replace('.', '')}" for a in info.get("cuda_archs") or [])
    ptx = info.get("ptx_arch")
    ptx = f" + PTX compute_{ptx.replace('.', '')}" if ptx else ""
    return f"yes ({archs}{ptx}; CUDA {info.get('torch_cuda')}, toolkit {info.get('cuda_home')})"


def format_report(r: Dict[str, Any]) -> str:
    lines = [
        f"nuwa-kernels {r['nuwa_kernels']} ({r['location']})",
        f"python       {r['python']} ({r['platform']})",
        f"torch        {r['torch']} (CUDA {r['torch_cuda'] or 'none: a CPU build'}; "
        f"GPU available: {'yes' if r['cuda_available'] else 'no'}; {r['threads']} CPU threads)",
        f"triton       {r['triton'] or 'not installed'}"
        + (f" (TRITON_INTERPRET={r['triton_interpret']})" if r["triton_interpret"] else ""),
        f"numpy        {r['numpy'] or 'not installed'}",
    ]
    ext = r["extension"]
    info = ext["build"]
    if ext["loaded"]:
        if info.get("torch"):
            lines.append(f"nuwa_kernels._C  loaded (built against torch {info['torch']}, -march={info.get('cpu_arch')})")
        else:
            lines.append("nuwa_kernels._C  loaded (no build record: built before nuwa_kernels/_build_info.py existed)")
        cuda = _archs_line(info) if info.get("torch") else "yes (archs not recorded)"
        if not ext.get("cuda_kernels"):
            cuda = "no"
        lines.append(f"  CUDA kernels   {cuda}")
        isa = ext.get("cpu_isa")
        if isa:
            lanes = "any head dim" if isa == "avx512" else "head dims in whole vectors"
            lines.append(f"  CPU kernels    {isa} (lane kernels: {lanes})")
    else:
        lines.append(f"nuwa_kernels._C  NOT loaded: {ext['error']}")
        lines.append(f"  fix: {ext['fix']}")
    for gpu in r["gpus"]:
        lines.append(f"GPU          {gpu['name']} (compute capability {gpu['capability']})")
    for device, backends in r["backends"].items():
        lines.append(f"backends on {device}:")
        if "error" in backends:
            lines.append(f"  (probe failed: {backends['error']})")
            continue
        for name, res in backends.items():
            lines.append(f"  {name:10s} {'ok' if res['ok'] else 'unavailable: ' + res['reason']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nuwa_kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
