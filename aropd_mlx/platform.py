"""Platform helpers: a fast BLAS for MLX's Linux CPU backend (doctor.py reports it).

The Linux ``mlx-cpu`` wheel calls a reference (netlib) ``cblas_sgemm`` that is ~20-30x
slower than OpenBLAS or MKL.  Putting a fast BLAS in front with ``LD_PRELOAD`` fixes that,
but it must be set before the process starts, so :func:`ensure_fast_blas` re-executes the
current command once with ``LD_PRELOAD`` set.  On macOS (Metal / Accelerate) nothing here
does anything.

Which BLAS, in this fixed order (the first one present that runs here wins):
  1. PyPI's ``cmeel-openblas`` (a Linux dependency of this package, so ``pip install`` alone
     brings it): OpenBLAS 0.3.31, ~420 GFLOP/s on 1024^3 on a 2-core AMD EPYC against ~230
     for Debian 12's 0.3.21 (README). It needs ``libgfortran.so.5``, which a bare machine
     lacks; the ``mlx-cpu`` wheel ships one under a hashed name (``mlx_cpu.libs``), so a
     private folder of links (:func:`_gfortran_links`) goes on ``LD_LIBRARY_PATH`` with it;
  2. Debian/Ubuntu's OpenBLAS (pthread, OpenMP, plain) in the system lib folders;
  3. PyPI's MKL (``<prefix>/lib/libmkl_rt.so.*``).

"Runs here": a library is built for some set of CPU instructions, and PyPI's cmeel-openblas
is not a multi-target build (0.3.31 is OpenBLAS's SKYLAKEX target: AVX-512; 0.3.29 was ZEN):
on a CPU without them every matmul dies with SIGILL. So each candidate first multiplies two
small matrices in a child process (blas_probe.py); the verdict is cached per library
file and CPU, and a library that fails is skipped with one line saying why.

Environment variables:
  AROPD_MLX_NO_BLAS_FIX=1   never preload a BLAS (opt-out)
  AROPD_MLX_QUIET=1         no info line (warnings are still printed)
  AROPD_MLX_BLAS=PATH       preload this BLAS library instead of the first one found
  AROPD_MLX_BLAS_FIX        internal marker: set once the fix was decided (no loops, no
                            repeated messages in re-executed or child processes)
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import platform as _platform
import sys

from aropd_mlx import blas_probe
from aropd_mlx.blas_probe import cache_home

OPT_OUT_ENV = "AROPD_MLX_NO_BLAS_FIX"
QUIET_ENV = "AROPD_MLX_QUIET"
MARKER_ENV = "AROPD_MLX_BLAS_FIX"
CHOICE_ENV = "AROPD_MLX_BLAS"

APT_HINT = "sudo apt-get install libopenblas0-pthread"
PIP_HINT = "pip install cmeel-openblas"

_FAST_MARKS = ("openblas", "mkl_rt", "libmkl")
# numpy / scipy bundle OpenBLAS with renamed symbols: mapped, but never used by MLX.
_NOT_INTERPOSING = ("numpy.libs", "scipy.libs", "scipy_openblas", "openblas64_")


def _is_linux() -> bool:
    return sys.platform.startswith("linux")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _multiarch_dirs() -> list[str]:
    machine = _platform.machine().lower()
    triplet = {
        "x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
        "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu",
        "ppc64le": "powerpc64le-linux-gnu", "s390x": "s390x-linux-gnu",
    }.get(machine, f"{machine}-linux-gnu")
    return [f"/usr/lib/{triplet}", f"/lib/{triplet}", "/usr/lib64", "/usr/lib"]


def blas_name(path: str) -> str:
    """A readable name for a BLAS library path."""
    low = os.path.basename(path).lower()
    if "openblas" in low:
        return "OpenBLAS"
    if "mkl" in low:
        return "MKL"
    if "accelerate" in path.lower():
        return "Accelerate"
    if "blas" in low:
        return "reference BLAS (netlib)"
    return os.path.basename(path)


def _site_dirs() -> list[str]:
    """Folders Python imports from (site-packages of this environment first)."""
    import site
    import sysconfig

    dirs = [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")]
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some virtualenvs
        pass
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def _cmeel_openblas() -> str | None:
    """``cmeel.prefix/lib/libopenblas.so.0`` of PyPI's cmeel-openblas, if installed."""
    for d in _site_dirs():
        path = os.path.join(d, "cmeel.prefix", "lib", "libopenblas.so.0")
        if os.path.isfile(path):
            return path
    return None


def _mlx_cpu_gfortran() -> tuple[str, str] | None:
    """(libgfortran, libquadmath) that the mlx-cpu wheel ships under hashed names."""
    for d in _site_dirs():
        libs = os.path.join(d, "mlx_cpu.libs")
        gf = sorted(glob.glob(os.path.join(libs, "libgfortran-*.so.5*")))
        qm = sorted(glob.glob(os.path.join(libs, "libquadmath-*.so*")))
        if gf and qm:
            return gf[-1], qm[-1]
    return None


def _link(target: str, link: str) -> None:
    """`link` -> `target`, replaced atomically (concurrent starts race harmlessly)."""
    if os.path.islink(link) and os.readlink(link) == target:
        return
    tmp = f"{link}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _gfortran_links() -> str | None:
    """A private folder where ``libgfortran.so.5`` (the name cmeel's OpenBLAS asks for) links
    to mlx-cpu's copy, beside its libquadmath; None when mlx-cpu ships none or nothing can be
    written. Always this folder, never the system's libgfortran: the same libraries on a bare
    machine and on one with Debian's packages."""
    found = _mlx_cpu_gfortran()
    if found is None:
        return None
    gfortran, quadmath = found
    key = hashlib.sha1(os.path.dirname(gfortran).encode()).hexdigest()[:10]
    for base in (cache_home(), os.path.join("/tmp", f"aropd-mlx-{os.getuid()}")):
        folder = os.path.join(base, "aropd-mlx", f"blas-libs-{key}")
        try:
            os.makedirs(folder, exist_ok=True)
            _link(gfortran, os.path.join(folder, "libgfortran.so.5"))
            _link(quadmath, os.path.join(folder, os.path.basename(quadmath)))
            return folder
        except OSError:
            continue
    return None


def _candidates() -> list[str]:
    """Fast BLAS libraries present here, in the module docstring's order (not yet probed)."""
    out = []
    cmeel = _cmeel_openblas()
    if cmeel and blas_library_path(cmeel) is not None:
        out.append(cmeel)
    dirs = _multiarch_dirs()
    system = [os.path.join(d, sub + "libopenblas.so.0")
              for sub in ("openblas-pthread/", "openblas-openmp/", "") for d in dirs]
    out += [p for p in system if os.path.isfile(p)][:1]
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        hits = [h for h in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so.*")))
                if os.path.isfile(h)]
        if hits:
            out.append(hits[-1])
            break
    return out


# Libraries find_fast_blas passed over in this process: (path, why); ensure_fast_blas says so.
SKIPPED: list[tuple[str, str]] = []


def find_fast_blas() -> str | None:
    """Path of a fast BLAS present on this Linux machine that runs on its CPU, or None
    (always None on macOS).

    ``$AROPD_MLX_BLAS`` when set (None if it does not run here; a missing file is recorded in
    ``SKIPPED`` and the usual order follows); otherwise the first of :func:`_candidates` that
    passes :func:`runs_here`. Candidates that fail are recorded in ``SKIPPED``.
    """
    if not _is_linux():
        return None
    chosen = os.environ.get(CHOICE_ENV, "").strip()
    if chosen and not os.path.isfile(chosen):
        if (chosen, f"{CHOICE_ENV}: no such file") not in SKIPPED:
            SKIPPED.append((chosen, f"{CHOICE_ENV}: no such file"))
        chosen = ""  # the usual candidates, rather than none
    candidates = [chosen] if chosen else _candidates()
    for path in candidates:
        ok, why = runs_here(path)
        if ok:
            return path
        if (path, why) not in SKIPPED:
            SKIPPED.append((path, why))
    return None


def runs_here(path: str) -> tuple[bool, str]:
    """blas_probe.runs_here with the library folders `path` needs."""
    return blas_probe.runs_here(path, blas_library_path(path) or [])


def blas_library_path(path: str) -> list[str] | None:
    """Folders `path` needs on LD_LIBRARY_PATH ([] for a system library), None if unusable."""
    if "cmeel.prefix" not in path:
        return []
    links = _gfortran_links()
    return [links] if links else None


def blas_env(path: str, env: dict | None = None) -> dict:
    """`env` (default os.environ) with `path` preloaded and its library folders searched."""
    env = dict(os.environ if env is None else env)
    old = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = path + (":" + old if old else "")
    extra = blas_library_path(path) or []
    if extra:
        old = env.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = ":".join(extra + ([old] if old else []))
    return env


def shell_exports() -> str:
    """``export`` lines that run a shell's later commands on the fast BLAS (``.ci/run``);
    empty when none is found."""
    import shlex

    path = find_fast_blas()
    if path is None:
        return ""
    env = blas_env(path)
    return "".join(f"export {k}={shlex.quote(env[k])}\n" for k in ("LD_PRELOAD", "LD_LIBRARY_PATH")
                   if k in env and env[k] != os.environ.get(k))


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _global_cblas_provider() -> str | None:
    """File that provides ``cblas_sgemm`` in the global symbol scope (LD_PRELOAD / the
    executable's own dependencies). Such a definition wins over mlx-cpu's bundled one."""
    try:
        libc = ctypes.CDLL(None)
        fn = libc.cblas_sgemm
    except (OSError, AttributeError):
        return None
    try:
        dladdr = libc.dladdr
    except AttributeError:
        try:
            dladdr = ctypes.CDLL("libdl.so.2").dladdr
        except (OSError, AttributeError):
            return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _is_fast(path: str) -> bool:
    low = path.lower()
    return any(m in low for m in _FAST_MARKS) and not any(m in low for m in _NOT_INTERPOSING)


def _active_fast_blas() -> str | None:
    """The fast BLAS already serving ``cblas_sgemm`` in this process, if any."""
    path = _global_cblas_provider()
    return path if path and _is_fast(path) else None


def _mapped_libs() -> list[str]:
    try:
        with open("/proc/self/maps") as fh:
            rows = [line.split(None, 5) for line in fh]
    except OSError:
        return []
    return list(dict.fromkeys(r[5].strip() for r in rows if len(r) == 6 and r[5].startswith("/")))


def loaded_blas() -> str:
    """Which BLAS this process's MLX actually uses: a readable name and path.

    Imports ``mlx.core`` (so its BLAS is mapped), then reads /proc/self/maps. A fast BLAS
    counts only if it serves ``cblas_sgemm`` globally (preloaded); otherwise the mapped
    reference BLAS that mlx-cpu bundles is reported. "Accelerate" on macOS.
    """
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        pass
    fast = _active_fast_blas()
    if fast:
        return f"{blas_name(fast)} ({fast})"
    libs = _mapped_libs()
    for path in libs:
        low = os.path.basename(path).lower()
        if ("libblas" in low or "libcblas" in low) and not _is_fast(path):
            where = "bundled with mlx-cpu" if "mlx_cpu" in path else "system"
            return f"reference BLAS (netlib, {where}) ({path})"
    for path in libs:
        if "accelerate" in path.lower():
            return f"Accelerate ({path})"
    return "unknown (no BLAS mapped)"


def _say(msg: str) -> None:
    print(f"aropd-mlx: {msg}", file=sys.stderr, flush=True)


def install_hint() -> str:
    """The command that installs a fast BLAS here."""
    debian = os.path.exists("/etc/debian_version")
    if any("cmeel.prefix" in p for p, _ in SKIPPED):  # pip's does not run on this CPU
        return APT_HINT if debian else "a system OpenBLAS (Debian/Ubuntu: " + APT_HINT + ")"
    if debian:
        return f"{PIP_HINT} (or: {APT_HINT})"
    return f"{PIP_HINT} (Debian/Ubuntu: {APT_HINT})"


def _info_line(path: str) -> str:
    return (f"using {blas_name(path)} ({path}) for MLX's CPU backend; "
            f"set {OPT_OUT_ENV}=1 to disable")


def _reexec_argv(argv: list[str] | None) -> list[str] | None:
    """[sys.executable, ...] to re-run this command, or None when that is impossible."""
    if not sys.executable:
        return None
    if argv is None:
        orig = getattr(sys, "orig_argv", None)
        if not orig or len(orig) < 2:
            return None  # interactive interpreter
        argv = list(orig[1:])
        # A script read from stdin ("-") or an interactive session cannot run twice.
        if not sys.argv or sys.argv[0] in ("", "-"):
            return None
    if not argv or argv[0] == "-":
        return None
    return [sys.executable, *argv]


def ensure_fast_blas(argv: list[str] | None = None) -> None:
    """Make MLX's Linux CPU backend use a fast BLAS; call first thing in a command.

    argv: what follows the interpreter to run this command again, e.g.
    ``["-m", "aropd_mlx.cli.main", "train", ...]``; default ``sys.orig_argv[1:]`` (covers
    console scripts, ``python -m`` and ``python -c``).

    On Linux, when no fast BLAS is active and :func:`find_fast_blas` finds one, says so
    once on stderr and replaces this process (``os.execve``) with the same command and
    ``LD_PRELOAD`` prepended. The marker env var stops any second re-exec and repeated
    messages in re-executed or child processes. Warns once, with the install command,
    when none is present. Does nothing on macOS, with AROPD_MLX_NO_BLAS_FIX=1, or under
    pytest (an in-process CLI test must not replace the test runner).
    """
    if not _is_linux() or _truthy(OPT_OUT_ENV):
        return
    if os.environ.get(MARKER_ENV, "noreexec") != "noreexec":
        return  # already decided (and announced) in this process tree; under a parent that
        # could not re-run itself (a stdin script, a notebook) this command still may
    quiet = _truthy(QUIET_ENV)
    active = _active_fast_blas()
    if active:
        os.environ[MARKER_ENV] = "active:" + active
        if not quiet:
            _say(_info_line(active))
        return
    path = find_fast_blas()
    if path is None or not quiet:
        for skipped, why in SKIPPED:
            _say(f"not using {skipped}: {why}")
    if path is None:
        os.environ[MARKER_ENV] = "missing"
        _say("no fast BLAS found: MLX's CPU backend will use its slow reference BLAS "
             f"(~20-30x slower matmuls). Install one: {install_hint()}")
        return
    if "_pytest" in sys.modules:
        return
    cmd, env = _reexec_argv(argv), blas_env(path)  # the preload needs its libgfortran folder
    if cmd is None:
        os.environ[MARKER_ENV] = "noreexec"
        how = " ".join(f"{k}={env[k]}" for k in ("LD_PRELOAD", "LD_LIBRARY_PATH") if env.get(k))
        _say(f"cannot re-run this command to use {blas_name(path)}; start it with {how}")
        return
    env[MARKER_ENV] = "active:" + path
    if not quiet:
        _say(_info_line(path))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        os.execve(sys.executable, cmd, env)
    except OSError as exc:  # keep running, slowly
        os.environ[MARKER_ENV] = "failed"
        _say(f"re-exec with LD_PRELOAD={path} failed ({exc}); continuing without it")


def blas_fix_status() -> str:
    """One line: is the BLAS fix active, disabled, not needed or unavailable?"""
    if not _is_linux():
        return "not needed (macOS: Accelerate)" if sys.platform == "darwin" else "not needed"
    if _truthy(OPT_OUT_ENV):
        return f"disabled ({OPT_OUT_ENV}=1)"
    active = _active_fast_blas()
    if active:
        return f"active ({blas_name(active)} via LD_PRELOAD)"
    found = find_fast_blas()
    skipped = "".join(f"; {p} skipped: {why}" for p, why in SKIPPED)
    if found is None:
        return f"unavailable: no fast BLAS that runs here{skipped}; install: {install_hint()}"
    return f"inactive ({found} present but not preloaded in this process){skipped}"
