"""`aropd-mlx doctor`: facts about this machine (versions, backend and device, memory, the
BLAS in use, a measured GEMM) in one table. platform.py chooses and loads the BLAS.

    print(format_doctor(doctor_info()))
"""
from __future__ import annotations

import os
import platform as _platform
import statistics
import subprocess
import sys
import time
from importlib import metadata

from aropd_mlx.platform import blas_fix_status, loaded_blas


def _median_seconds(fn, repeats: int) -> float:
    """Median wall time of mx.eval(fn()) after one warm-up call."""
    import mlx.core as mx

    mx.eval(fn())
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Median measured float32 GEMM speed (GFLOP/s) of MLX's default device, n x n x n."""
    import mlx.core as mx

    a = mx.random.normal((n, n), dtype=mx.float32)
    b = mx.random.normal((n, n), dtype=mx.float32)
    mx.eval(a, b)
    return 2.0 * n**3 / _median_seconds(lambda: a @ b, repeats) / 1e9


def memory_bandwidth_gbs(n: int = 8192, repeats: int = 5) -> float:
    """Median measured read bandwidth (GB/s) of a float32 matrix-vector product on MLX's
    default device: an n x n matrix (256 MB at n = 8192, far past any cache) read once per
    product, the way a decode step reads the weights (memory-bound, through the same BLAS)."""
    import mlx.core as mx

    a = mx.random.normal((n, n), dtype=mx.float32)
    x = mx.random.normal((n, 1), dtype=mx.float32)
    mx.eval(a, x)
    return 4.0 * n * n / _median_seconds(lambda: a @ x, repeats) / 1e9


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def memory_total_bytes() -> int | None:
    """Physical memory of this machine in bytes (no psutil)."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True,
                                 text=True, timeout=5, check=True)
            return int(out.stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def doctor_info(bench: bool = True) -> dict:
    """Facts about this machine for ``aropd-mlx doctor`` (bench=False skips the GEMM)."""
    info: dict = {
        "python": f"{_platform.python_version()} ({sys.executable})",
        "platform": f"{_platform.system()} {_platform.release()} {_platform.machine()}",
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "backend": None,
        "device": None,
        "memory_total_gb": None,
        "blas": None,
        "gemm_gflops": None,
        "bandwidth_gbs": None,
        "blas_fix": blas_fix_status(),
        "torch": None,
        "torch_cuda": None,
        "transformers": _version("transformers"),
    }
    mem = memory_total_bytes()
    info["memory_total_gb"] = round(mem / 1e9, 1) if mem else None  # GB as --memory-limit reads it
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            info["backend"] = "Metal"
        elif hasattr(mx, "cuda") and mx.cuda.is_available():
            info["backend"] = "CUDA"
        else:
            info["backend"] = "CPU"
        device = str(mx.default_device())
        try:
            name = (mx.device_info() if hasattr(mx, "device_info")
                    else mx.metal.device_info()).get("device_name")
            device = f"{device} {name}" if name else device
        except Exception:  # noqa: BLE001 - best effort only
            pass
        info["device"] = device
        info["blas"] = loaded_blas()
        if bench:
            info["gemm_gflops"] = round(gemm_gflops(), 1)
            info["bandwidth_gbs"] = round(memory_bandwidth_gbs(), 1)
    except ImportError as exc:
        info["backend"] = f"mlx not importable: {exc}"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = bool(torch.cuda.is_available())
    except Exception as exc:  # noqa: BLE001 - torch is optional
        info["torch"] = f"not importable ({type(exc).__name__})"
    return info


_LABELS = {
    "python": "Python", "platform": "Platform", "mlx": "mlx", "mlx_lm": "mlx-lm",
    "backend": "Backend", "device": "Device", "memory_total_gb": "Memory (GB)",
    "blas": "BLAS in use", "gemm_gflops": "GEMM f32 1024³ (GFLOP/s)",
    "bandwidth_gbs": "read bandwidth, f32 GEMV 8192² (GB/s)",
    "blas_fix": "BLAS fix", "torch": "torch", "torch_cuda": "torch CUDA",
    "transformers": "transformers",
}


def format_doctor(info: dict) -> str:
    """A readable two-column table of :func:`doctor_info`."""
    rows = [(_LABELS.get(k, k), "-" if v is None else str(v)) for k, v in info.items()]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
