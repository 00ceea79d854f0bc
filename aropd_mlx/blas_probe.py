"""Does a BLAS library run on this CPU? (platform.py asks before preloading one.)

A library is built for some set of CPU instructions; PyPI's cmeel-openblas is not a
multi-target build (0.3.31 is OpenBLAS's SKYLAKEX target: AVX-512), so on a CPU without them
its first matmul dies with SIGILL. :func:`runs_here` multiplies two small matrices with it in
a child process and caches the verdict per library file and CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
import signal
import subprocess
import sys


def cache_home() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


# Run in a child: load the library and multiply two 128 x 128 matrices of ones into C = 2
# with beta 0.5 (every entry must be 129); its exit says whether the library runs here.
_PROBE_CODE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
n = 128
M = ctypes.c_float * (n * n)
a, b, c = M(*[1.0] * (n * n)), M(*[1.0] * (n * n)), M(*[2.0] * (n * n))
f = lib.cblas_sgemm
f.restype = None
f.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, M, ctypes.c_int, M, ctypes.c_int,
                                   ctypes.c_float, M, ctypes.c_int]
f(101, 111, 111, n, n, n, 1.0, a, n, b, n, 0.5, c, n)
bad = sum(1 for x in c if x != n + 1.0)
sys.exit(f"{bad} of {n * n} entries wrong" if bad else 0)
"""


def _cpu_signature() -> str:
    """What decides which instructions run here: the CPU's model name and flags."""
    try:
        with open("/proc/cpuinfo") as fh:
            rows = [line for line in fh if line.startswith(("model name", "flags"))]
    except OSError:
        rows = []
    return _platform.machine() + "".join(sorted(set(rows)))


def _probe_key(path: str) -> str:
    try:
        st = os.stat(path)
        ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        ident = path
    return hashlib.sha1(f"{ident}|{_cpu_signature()}".encode()).hexdigest()[:16]


def _probe_cache() -> str:
    return os.path.join(cache_home(), "aropd-mlx", "blas-probe.json")


UNFINISHED = "its test multiplication did not finish"  # a busy machine: probed again next time


def probe_blas(path: str, lib_dirs=()) -> tuple[bool, str]:
    """Run :data:`_PROBE_CODE` on `path` in a child process, `lib_dirs` first on its library
    path: (runs, why not)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if lib_dirs:
        env["LD_LIBRARY_PATH"] = ":".join([*lib_dirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CODE, path], env=env,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:  # not a verdict on the library
        return False, f"{UNFINISHED} ({exc.__class__.__name__})"
    if proc.returncode == 0:
        return True, ""
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        hint = " (built for instructions this CPU lacks)" if name == "SIGILL" else ""
        return False, f"a test multiplication was killed by {name}{hint}"
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"a test multiplication failed: {last}"


def runs_here(path: str, lib_dirs=()) -> tuple[bool, str]:
    """(True, "") if the BLAS at `path` multiplies correctly on this CPU, else (False, why).
    The verdict is cached per library file and CPU (a child process costs ~0.1 s)."""
    key = _probe_key(path)
    cache = _probe_cache()
    try:
        with open(cache) as fh:
            known = json.load(fh)
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}  # valid JSON of another shape: no cache
    if isinstance(known.get(key), list) and len(known[key]) == 2:
        return bool(known[key][0]), str(known[key][1])
    ok, why = probe_blas(path, lib_dirs)
    if why.startswith(UNFINISHED):  # a timeout or a failed start says nothing of the library
        return ok, why
    known[key] = [ok, why]
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(known, fh)
        os.replace(tmp, cache)
    except OSError:
        pass  # no cache: probe again next time
    return ok, why
