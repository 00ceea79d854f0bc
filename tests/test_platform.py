"""Tests for aropd_mlx.platform: BLAS selection by re-exec, opt-out, doctor facts."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from aropd_mlx import doctor
from aropd_mlx import blas_probe as probe
from aropd_mlx import platform as plat

LINUX = sys.platform.startswith("linux")
FAST = plat.find_fast_blas()
needs_linux = pytest.mark.skipif(not LINUX, reason="the BLAS fix only acts on Linux")
needs_fast = pytest.mark.skipif(
    FAST is None,
    reason=f"no fast BLAS on this machine (install: {plat.install_hint()})",
)
INFO = "aropd-mlx: using "
PROBE = ("from aropd_mlx.platform import ensure_fast_blas, loaded_blas; "
         "ensure_fast_blas(); print(loaded_blas())")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH", plat.MARKER_ENV, plat.OPT_OUT_ENV,
                        plat.QUIET_ENV, plat.CHOICE_ENV, "PYTEST_CURRENT_TEST")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


@needs_linux
@needs_fast
def test_fix_selects_fast_blas_and_opt_out_keeps_reference():
    fixed = _run(["-c", PROBE], _env())
    plain = _run(["-c", PROBE], _env(**{plat.OPT_OUT_ENV: "1"}))
    fixed_blas, plain_blas = fixed.stdout.strip(), plain.stdout.strip()
    assert fixed_blas.startswith(("OpenBLAS", "MKL")), fixed_blas
    assert FAST in fixed_blas
    assert plain_blas.startswith("reference BLAS"), plain_blas
    assert fixed_blas != plain_blas
    # The info line exactly once, naming the library and the opt-out.
    assert fixed.stderr.count(INFO) == 1, fixed.stderr
    assert FAST in fixed.stderr and plat.OPT_OUT_ENV in fixed.stderr
    assert plain.stderr.count("aropd-mlx:") == 0, plain.stderr


@needs_linux
@needs_fast
def test_quiet_mode_hides_info_but_still_fixes():
    proc = _run(["-c", PROBE], _env(**{plat.QUIET_ENV: "1"}))
    assert proc.stdout.strip().startswith(("OpenBLAS", "MKL"))
    assert "aropd-mlx:" not in proc.stderr


@needs_linux
@needs_fast
def test_reexec_happens_once_and_keeps_script_args(tmp_path):
    log = tmp_path / "starts.log"
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        with open({str(log)!r}, "a") as fh:
            fh.write(os.environ.get("LD_PRELOAD", "-") + "\\n")
        from aropd_mlx.platform import ensure_fast_blas, loaded_blas
        ensure_fast_blas()
        ensure_fast_blas()  # a second call must not re-exec again
        print(sys.argv[1:])
        print(loaded_blas())
    """))
    proc = _run([str(script), "a b", "--flag"], _env())
    starts = log.read_text().splitlines()
    assert len(starts) == 2, starts  # the original run plus exactly one re-exec
    assert starts[0] == "-" and starts[1].split(":")[0] == FAST
    out = proc.stdout.splitlines()
    assert out[0] == "['a b', '--flag']"
    assert out[1].startswith(("OpenBLAS", "MKL"))
    assert proc.stderr.count(INFO) == 1, proc.stderr


@needs_linux
@needs_fast
def test_reexec_works_for_python_dash_m(tmp_path):
    (tmp_path / "probe_mod.py").write_text(
        "import sys\n" + PROBE.replace("; ", "\n") + "\nprint(sys.argv[1:])\n")
    proc = _run(["-m", "probe_mod", "x"], _env(PYTHONPATH=str(tmp_path)), cwd=tmp_path)
    blas, args = proc.stdout.splitlines()
    assert blas.startswith(("OpenBLAS", "MKL")) and args == "['x']"
    assert proc.stderr.count(INFO) == 1


@needs_linux
@needs_fast
def test_children_inherit_fix_silently():
    code = PROBE + textwrap.dedent("""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", %r], check=True)
    """) % PROBE
    proc = _run(["-c", code], _env())
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(x.startswith(("OpenBLAS", "MKL")) for x in lines)
    assert proc.stderr.count(INFO) == 1, proc.stderr


@needs_linux
def test_marker_prevents_any_reexec(tmp_path):
    # With the marker already set the process must never exec, whatever it finds.
    proc = _run(["-c", PROBE], _env(**{plat.MARKER_ENV: "active:/nonexistent"}))
    assert proc.stdout.strip().startswith("reference BLAS")
    assert proc.stderr == ""


def test_missing_blas_warns_once_with_install_command(monkeypatch, capsys):
    monkeypatch.setattr(plat.sys, "platform", "linux")
    monkeypatch.setattr(plat, "find_fast_blas", lambda: None)
    monkeypatch.setattr(plat, "_active_fast_blas", lambda: None)
    monkeypatch.setattr(plat, "SKIPPED", [])
    for name in (plat.MARKER_ENV, plat.OPT_OUT_ENV, plat.QUIET_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(plat.QUIET_ENV, "1")  # quiet never hides the warning
    plat.ensure_fast_blas()
    plat.ensure_fast_blas()
    err = capsys.readouterr().err
    assert err.count("no fast BLAS found") == 1
    assert "sudo apt-get install libopenblas0-pthread" in err and "pip install cmeel-openblas" in err


def test_under_pytest_never_reexecs(monkeypatch):
    monkeypatch.setattr(plat.sys, "platform", "linux")
    monkeypatch.setattr(plat, "find_fast_blas", lambda: "/usr/lib/libopenblas.so.0")
    monkeypatch.setattr(plat, "_active_fast_blas", lambda: None)
    monkeypatch.delenv(plat.MARKER_ENV, raising=False)
    monkeypatch.delenv(plat.OPT_OUT_ENV, raising=False)

    def boom(*a, **k):
        raise AssertionError("execve called under pytest")

    monkeypatch.setattr(plat.os, "execve", boom)
    plat.ensure_fast_blas()


def test_macos_does_nothing(monkeypatch, capsys):
    monkeypatch.setattr(plat.sys, "platform", "darwin")
    monkeypatch.delenv(plat.MARKER_ENV, raising=False)
    monkeypatch.setattr(plat.os, "execve", lambda *a: pytest.fail("execve on macOS"))
    assert plat.find_fast_blas() is None
    plat.ensure_fast_blas()
    assert capsys.readouterr().err == ""
    assert plat.loaded_blas() == "Accelerate"


def test_reexec_argv_refuses_stdin_scripts(monkeypatch):
    monkeypatch.setattr(plat.sys, "argv", ["-"])
    monkeypatch.setattr(plat.sys, "orig_argv", [sys.executable, "-"], raising=False)
    assert plat._reexec_argv(None) is None
    assert plat._reexec_argv(["-m", "x", "y"]) == [sys.executable, "-m", "x", "y"]


def test_gemm_gflops_positive():
    g = doctor.gemm_gflops(256, repeats=2)
    assert isinstance(g, float) and g > 0


def test_loaded_blas_names_something():
    name = plat.loaded_blas()
    assert isinstance(name, str) and name and not name.startswith("unknown")


def test_doctor_info_keys_and_format():
    info = doctor.doctor_info(bench=False)
    keys = {"python", "platform", "mlx", "mlx_lm", "backend", "device", "memory_total_gb",
            "blas", "gemm_gflops", "blas_fix", "torch", "torch_cuda", "transformers"}
    assert keys <= set(info)
    assert info["mlx"] and info["backend"] in ("Metal", "CUDA", "CPU")
    assert info["memory_total_gb"] and info["memory_total_gb"] > 0
    assert info["gemm_gflops"] is None and info["bandwidth_gbs"] is None
    text = doctor.format_doctor(info)
    assert len(text.splitlines()) == len(info)
    assert "BLAS in use" in text and "mlx-lm" in text


def test_doctor_info_measures_gemm_and_bandwidth(monkeypatch):
    monkeypatch.setattr(doctor, "gemm_gflops", lambda *a, **k: 12.5)
    monkeypatch.setattr(doctor, "memory_bandwidth_gbs", lambda *a, **k: 7.5)
    info = doctor.doctor_info()
    assert (info["gemm_gflops"], info["bandwidth_gbs"]) == (12.5, 7.5)
    assert "read bandwidth" in doctor.format_doctor(info)


CMEEL = plat._cmeel_openblas() if LINUX else None
MAPS_PROBE = PROBE + """
import ctypes
libs = [l.split()[-1] for l in open('/proc/self/maps') if l.split()[-1].startswith('/')]
print([p for p in dict.fromkeys(libs) if 'gfortran' in p or 'blas' in p.lower()])
"""


CMEEL_RUNS = CMEEL is not None and plat.runs_here(CMEEL)[0]


@needs_linux
@pytest.mark.skipif(not CMEEL_RUNS, reason="cmeel-openblas not installed or not built for this CPU")
def test_pip_openblas_is_first_and_needs_no_system_library():
    """A bare machine has no libopenblas and no libgfortran: cmeel's OpenBLAS must run on
    mlx-cpu's own libgfortran, whatever the system has, and be chosen before a system BLAS."""
    assert plat.find_fast_blas() == CMEEL
    proc = _run(["-c", MAPS_PROBE], _env())
    blas, mapped = proc.stdout.splitlines()
    assert blas == f"OpenBLAS ({CMEEL})"
    mapped = eval(mapped)  # noqa: S307 - our own probe's printed list
    gfortran = [p for p in mapped if "gfortran" in p]
    assert gfortran and all("mlx_cpu.libs" in p for p in gfortran), mapped
    assert all("cmeel.prefix" in p for p in mapped if "libopenblas" in p), mapped
    assert doctor.gemm_gflops(256, repeats=1) > 0


def test_blas_order_and_override(monkeypatch, tmp_path):
    monkeypatch.setattr(plat.sys, "platform", "linux")
    monkeypatch.setattr(plat, "runs_here", lambda path: (True, ""))
    monkeypatch.delenv(plat.CHOICE_ENV, raising=False)
    pip_blas = str(tmp_path / "cmeel.prefix" / "lib" / "libopenblas.so.0")
    monkeypatch.setattr(plat, "_cmeel_openblas", lambda: pip_blas)
    monkeypatch.setattr(plat, "_gfortran_links", lambda: str(tmp_path / "links"))
    assert plat.find_fast_blas() == pip_blas  # before any system OpenBLAS
    env = plat.blas_env(pip_blas, {"LD_PRELOAD": "/a.so", "LD_LIBRARY_PATH": "/x"})
    assert env["LD_PRELOAD"] == f"{pip_blas}:/a.so"
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path / 'links'}:/x"
    monkeypatch.setattr(plat, "_gfortran_links", lambda: None)  # no libgfortran to give it
    assert plat.find_fast_blas() != pip_blas
    own = tmp_path / "libmyblas.so"
    own.write_bytes(b"")
    monkeypatch.setenv(plat.CHOICE_ENV, str(own))
    assert plat.find_fast_blas() == str(own)
    assert plat.blas_env(str(own), {})["LD_PRELOAD"] == str(own)
    missing = str(tmp_path / "missing.so")  # named in the "not using" lines, then the usual order
    monkeypatch.setattr(plat, "SKIPPED", [])
    monkeypatch.setenv(plat.CHOICE_ENV, missing)
    monkeypatch.setattr(plat, "_candidates", lambda: [str(own)])
    assert plat.find_fast_blas() == str(own)
    assert plat.SKIPPED == [(missing, f"{plat.CHOICE_ENV}: no such file")]


@needs_linux
@needs_fast
def test_shell_exports_run_a_shell_on_the_fast_blas():
    exports = subprocess.run([sys.executable, "-c", "from aropd_mlx.platform import "
                              "shell_exports; print(shell_exports(), end='')"], env=_env(),
                             capture_output=True, text=True, check=True).stdout
    assert exports.startswith("export LD_PRELOAD=")
    script = exports + f"{sys.executable} -c " + repr(
        "from aropd_mlx.platform import loaded_blas; print(loaded_blas())")
    out = subprocess.run(["bash", "-c", script], env=_env(**{plat.OPT_OUT_ENV: "1"}),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{plat.blas_name(FAST)} ({FAST})"


# --- a BLAS built for instructions this CPU lacks (cmeel-openblas 0.3.31 is a SKYLAKEX build)

def _corename(path: str) -> str:
    """OpenBLAS's build target, read in a child (naming it runs no kernel)."""
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
            "lib.openblas_get_corename.restype = ctypes.c_char_p; "
            "print(lib.openblas_get_corename().decode())")
    env = plat.blas_env(path, _env())
    env.pop("LD_PRELOAD")
    return subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as fh:
        return {f for line in fh if line.startswith("flags") for f in line.split(":")[1].split()}


@needs_linux
@pytest.mark.skipif(CMEEL is None, reason="cmeel-openblas (a Linux dependency) not installed")
def test_the_probe_verdict_on_pip_openblas_follows_its_target_and_this_cpu():
    """Independent of the probe: an AVX-512 target (SKYLAKEX, COOPERLAKE, SAPPHIRERAPIDS)
    runs exactly where the CPU has avx512f; Haswell/Zen targets need avx2."""
    target = _corename(CMEEL).upper()
    flags = _cpu_flags()
    needs = ("avx512f" if target in ("SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS") else
             "avx2" if target in ("HASWELL", "ZEN") else None)
    if needs is None:
        pytest.skip(f"no known instruction need for target {target}")
    ok, why = probe.probe_blas(CMEEL, plat.blas_library_path(CMEEL))
    assert ok == (needs in flags), (target, why)
    if not ok:
        assert "SIGILL" in why
        assert (CMEEL, why) in plat.SKIPPED or plat.find_fast_blas() != CMEEL


def test_probe_reports_a_library_that_does_not_load_or_kills_its_process(monkeypatch, tmp_path):
    empty = tmp_path / "libempty.so"
    empty.write_bytes(b"")
    ok, why = probe.probe_blas(str(empty))
    assert not ok and "failed" in why and "OSError" in why
    monkeypatch.setattr(probe, "_PROBE_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    ok, why = probe.probe_blas(str(empty))
    assert not ok and "killed by SIGILL" in why and "instructions this CPU lacks" in why
    monkeypatch.setattr(probe, "_PROBE_CODE", "import sys; sys.exit('3 of 9 entries wrong')")
    assert probe.probe_blas(str(empty)) == (False, "a test multiplication failed: 3 of 9 entries wrong")


@needs_linux
@needs_fast
def test_probe_multiplies_correctly_on_the_blas_in_use():
    assert probe.probe_blas(FAST, plat.blas_library_path(FAST)) == (True, "")


def test_probe_verdicts_are_cached_per_library_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"x")
    calls = []
    monkeypatch.setattr(probe, "probe_blas", lambda p, dirs: calls.append(p) or (False, "why"))
    assert probe.runs_here(str(lib)) == (False, "why")
    assert probe.runs_here(str(lib)) == (False, "why") and len(calls) == 1  # cached
    monkeypatch.setattr(probe, "_cpu_signature", lambda: "another cpu")
    assert probe.runs_here(str(lib)) == (False, "why") and len(calls) == 2  # probed again
    lib.write_bytes(b"another build")
    probe.runs_here(str(lib))
    assert len(calls) == 3


def test_a_probe_cache_of_another_shape_and_an_unfinished_probe_are_not_verdicts(monkeypatch,
                                                                                 tmp_path):
    """A cache file holding a JSON list (not an object) is no cache, not a crash of every
    command; a probe that timed out (a busy machine) is not cached as "does not run here"."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "aropd-mlx" / "blas-probe.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("[1, 2]")
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"x")
    verdicts = [(False, probe.UNFINISHED + " (TimeoutExpired)"), (True, "")]
    calls = []
    monkeypatch.setattr(probe, "probe_blas", lambda p, dirs: calls.append(p) or verdicts[len(calls) - 1])
    assert probe.runs_here(str(lib))[0] is False  # the timeout: reported, not kept
    assert probe.runs_here(str(lib)) == (True, "") and len(calls) == 2  # probed again
    assert probe.runs_here(str(lib)) == (True, "") and len(calls) == 2  # now cached


def test_a_blas_that_does_not_run_here_is_passed_over_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(plat.sys, "platform", "linux")
    for name in (plat.MARKER_ENV, plat.OPT_OUT_ENV, plat.QUIET_ENV, plat.CHOICE_ENV):
        monkeypatch.delenv(name, raising=False)
    pip_blas, system = "/p/cmeel.prefix/lib/libopenblas.so.0", "/usr/lib/libopenblas.so.0"
    monkeypatch.setattr(plat, "SKIPPED", [])
    monkeypatch.setattr(plat, "_candidates", lambda: [pip_blas, system])
    monkeypatch.setattr(plat, "runs_here", lambda p: (p == system, "" if p == system else "SIGILL"))
    monkeypatch.setattr(plat, "_active_fast_blas", lambda: None)  # as if nothing preloaded
    assert plat.find_fast_blas() == system
    assert plat.find_fast_blas() == system and plat.SKIPPED == [(pip_blas, "SIGILL")]
    assert "skipped: SIGILL" in plat.blas_fix_status()
    # Nothing else runs here: one warning, naming the library, why, and a system OpenBLAS.
    monkeypatch.setattr(plat, "_candidates", lambda: [pip_blas])
    plat.ensure_fast_blas()
    err = capsys.readouterr().err
    assert err.count(f"not using {pip_blas}: SIGILL") == 1
    assert "no fast BLAS found" in err and "libopenblas0-pthread" in err
    assert "pip install cmeel-openblas" not in err


@needs_linux
@needs_fast
def test_the_hint_of_a_process_that_cannot_re_run_itself_works_as_printed(tmp_path):
    """A script read from stdin cannot be re-executed: the line it prints says how to start
    it on the fast BLAS, and following it as printed (both variables: the pip OpenBLAS needs
    its libgfortran folder) loads that BLAS instead of killing the process."""
    import shlex

    script = "from aropd_mlx.platform import ensure_fast_blas; ensure_fast_blas()\n"
    res = subprocess.run([sys.executable, "-"], input=script, env=_env(), text=True,
                         capture_output=True, timeout=120, cwd=tmp_path)
    line = next(l for l in res.stderr.splitlines() if "cannot re-run" in l)
    assigns = shlex.split(line.split("start it with ", 1)[1])
    env = _env(**dict(a.split("=", 1) for a in assigns))
    assert "LD_PRELOAD" in env
    ok = subprocess.run([sys.executable, "-c", "from aropd_mlx.platform import loaded_blas; "
                         "print(loaded_blas())"], env={**env, plat.OPT_OUT_ENV: "1"},
                        text=True, capture_output=True, timeout=120, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


@needs_linux
@needs_fast
def test_a_child_of_a_process_that_could_not_re_run_itself_still_gets_the_fast_blas(tmp_path):
    """The marker a stdin script leaves ("noreexec") is inherited by what it starts: a child
    command that can re-run itself still does so (it stayed on the reference BLAS, silently)."""
    res = subprocess.run([sys.executable, "-c", PROBE], env=_env(**{plat.MARKER_ENV: "noreexec"}),
                         text=True, capture_output=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "reference" not in res.stdout.lower() and res.stdout.strip(), res.stdout
