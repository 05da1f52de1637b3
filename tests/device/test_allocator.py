"""Allocator control: finding tcmalloc/jemalloc, telling which malloc a process runs on, the CLI's one re-exec with
LD_PRELOAD (and --allocator glibc skipping it), falling back with a warning, and the cost model's slack per allocator.

The libraries come from Debian's libtcmalloc-minimal4 and libjemalloc2 (``make test`` installs them as root); tests
that need one skip without it, except in CI (``EDGE_ALAST_REQUIRE_ASSETS=1``), where it must be there.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from click.testing import CliRunner

from tests.helpers import REPO, TINY_ARGS, TINY_MODEL, make_image_folder
from edge_alast.device import allocator
from edge_alast.device.allocator import REEXEC_ENV, allocator_in_use, find_library, reexec_with_allocator

PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}


def require_library(name: str) -> str:
    path = find_library(name)
    if path:
        return path
    if os.environ.get("EDGE_ALAST_REQUIRE_ASSETS") == "1":
        pytest.fail(f"{name} not installed (apt-get install {PACKAGES[name]}; EDGE_ALAST_REQUIRE_ASSETS=1)")
    pytest.skip(f"{name} not installed (apt-get install {PACKAGES[name]})")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_ENV)}
    return {**env, **extra}


# ---------------------------------------------------------------- discovery and detection


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc"])
def test_find_library_finds_the_installed_shared_object(name):
    path = require_library(name)
    assert os.path.basename(path) in allocator.SONAMES[name]
    assert not os.path.isabs(path) or os.path.isfile(path)


def test_find_library_without_the_library(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "_library_dirs", lambda: [tmp_path])
    monkeypatch.setattr(allocator, "_ldconfig_paths", lambda: {})
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    allocator.find_library.cache_clear()
    try:
        assert find_library("tcmalloc") is None and find_library("jemalloc") is None
        (tmp_path / "libjemalloc.so.2").write_bytes(b"")
        allocator.find_library.cache_clear()
        assert find_library("jemalloc") == str(tmp_path / "libjemalloc.so.2")
    finally:
        allocator.find_library.cache_clear()
    assert find_library("glibc") is None


def test_ldconfig_cache_lines_are_read_for_this_word_size(monkeypatch):
    text = ("\tlibjemalloc.so.2 (libc6,x86-64) => /lib/x86_64-linux-gnu/libjemalloc.so.2\n"
            "\tlibjemalloc.so.2 (libc6) => /lib/i386-linux-gnu/libjemalloc.so.2\n"
            "\tlibtcmalloc_minimal.so.4 (libc6,AArch64) => /lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4\n")
    monkeypatch.setattr(allocator.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=text, stderr=""))
    found = allocator._ldconfig_paths()
    if sys.maxsize > 2**32:
        assert found == {"libjemalloc.so.2": "/lib/x86_64-linux-gnu/libjemalloc.so.2",
                         "libtcmalloc_minimal.so.4": "/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"}


def _in_use_in_subprocess(env: dict) -> str:
    code = "from edge_alast.device.allocator import allocator_in_use; print(allocator_in_use())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc"])
def test_allocator_in_use_sees_an_ld_preload(name):
    path = require_library(name)
    assert _in_use_in_subprocess(clean_env(LD_PRELOAD=path)) == name


def _non_pie_python() -> str | None:
    """A system Python built as a non-PIE executable (ELF type EXEC), as Debian's and Raspberry Pi OS's
    /usr/bin/python3.11 are, or None."""
    for path in ("/usr/bin/python3.11", "/usr/bin/python3"):
        try:
            with open(path, "rb") as f:
                head = f.read(18)
        except OSError:
            continue
        if head[:4] == b"\x7fELF" and int.from_bytes(head[16:18], sys.byteorder) == 2:
            return path
    return None


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc"])
def test_allocator_in_use_sees_an_ld_preload_in_a_non_pie_python(name):
    # There the global lookup of malloc answers with the program's own PLT entry, not the preloaded library's
    # (found by make check-arm64: Raspberry Pi OS's python3.11 under --allocator auto reported glibc).
    path = require_library(name)
    python = _non_pie_python()
    if python is None:
        pytest.skip("no non-PIE system Python here (Debian's /usr/bin/python3.11 is one)")
    code = ("import ctypes, os; from pathlib import Path\n"
            "from edge_alast.device.allocator import _mapping_of, allocator_in_use\n"
            "address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value\n"
            "owner = _mapping_of(address, Path('/proc/self/maps').read_text())\n"
            "print(os.path.realpath(owner) == os.path.realpath(os.readlink('/proc/self/exe')), allocator_in_use())")
    for preload, want in ((path, name), ("", "glibc")):
        env = clean_env(PYTHONPATH=str(REPO), **({"LD_PRELOAD": preload} if preload else {}))
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["True", want], (preload, proc.stdout)


def test_allocator_in_use_is_glibc_without_a_preload_and_after_mallopt():
    assert _in_use_in_subprocess(clean_env()) == "glibc"
    code = ("from edge_alast.device.allocator import allocator_in_use, tune_glibc\n"
            "assert tune_glibc()\nprint(allocator_in_use())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert proc.stdout.strip() == "glibc-tuned", proc.stderr


def test_a_library_loaded_with_dlopen_is_not_the_allocator():
    path = require_library("tcmalloc")
    code = (f"import ctypes; ctypes.CDLL({path!r})\n"
            "from edge_alast.device.allocator import allocator_in_use; print(allocator_in_use())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert proc.stdout.strip() == "glibc", proc.stderr


def test_ld_preload_entries_other_than_allocators_are_kept():
    assert allocator._without_allocators("/x/libgomp.so.1 /usr/lib/libtcmalloc_minimal.so.4:libjemalloc.so.2:b.so") \
        == ["/x/libgomp.so.1", "b.so"]


# ---------------------------------------------------------------- re-exec decisions, in-process (execve patched)


@pytest.fixture
def no_exec(monkeypatch):
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise AssertionError("stop")  # an execve that returned would be a bug: make it loud

    monkeypatch.setattr(allocator.os, "execve", fake_execve)
    monkeypatch.setattr(allocator, "allocator_in_use", lambda: "glibc")
    monkeypatch.delenv(REEXEC_ENV, raising=False)
    return calls


def test_a_missing_library_is_a_warning_not_a_failure(no_exec, monkeypatch):
    monkeypatch.setattr(allocator, "find_library", lambda name: None)
    warning = reexec_with_allocator("tcmalloc", argv=["edge-alast", "train"])
    assert "libtcmalloc_minimal.so.4 not found" in warning and "apt-get install libtcmalloc-minimal4" in warning
    assert "tcmalloc is not installed" in reexec_with_allocator("auto", argv=["edge-alast", "train"])
    assert reexec_with_allocator("glibc", argv=["edge-alast", "train"]) is None
    assert no_exec == []


def test_reexec_preloads_the_library_first_and_marks_the_pid(no_exec, monkeypatch):
    monkeypatch.setattr(allocator, "find_library", lambda name: f"/lib/lib{name}.so")
    monkeypatch.setenv("LD_PRELOAD", "/x/libgomp.so.1")
    with pytest.raises(AssertionError, match="stop"):
        reexec_with_allocator("auto", argv=["/venv/bin/python", "-m", "edge_alast.cli", "train", "--json"])
    [(path, argv, env)] = no_exec
    assert path == sys.executable and argv == [sys.executable, "-m", "edge_alast.cli", "train", "--json"]
    assert env["LD_PRELOAD"] == f"/lib/lib{allocator.AUTO_ORDER[0]}.so:/x/libgomp.so.1"
    assert env[REEXEC_ENV] == str(os.getpid())
    # The re-executed process (same pid, marker set) never executes again, whatever it finds.
    monkeypatch.setenv(REEXEC_ENV, str(os.getpid()))
    assert "did not take effect" in reexec_with_allocator("jemalloc", argv=["edge-alast", "train"])
    assert len(no_exec) == 1


def test_auto_keeps_an_allocator_the_user_preloaded(no_exec, monkeypatch):
    monkeypatch.setattr(allocator, "allocator_in_use", lambda: "jemalloc")
    assert reexec_with_allocator("auto", argv=["edge-alast", "train"]) is None
    assert no_exec == []


# ---------------------------------------------------------------- the CLI, in real processes


SITECUSTOMIZE = textwrap.dedent("""
    # Test hook: log every interpreter start (a re-exec keeps the pid) and, when asked, hide the libraries.
    import os
    if os.environ.get("ALLOC_TEST_LOG"):
        import edge_alast.device.allocator as a
        if os.environ.get("ALLOC_TEST_NO_LIBS"):
            a.find_library = lambda name: None
        with open(os.environ["ALLOC_TEST_LOG"], "a") as f:
            f.write(f"{os.getpid()} {a.allocator_in_use()}\\n")
""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alloc")
    data = make_image_folder(tmp / "data")
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cfg = dict(data=str(data), model=TINY_MODEL, model_args=dict(TINY_ARGS), img_size=32, steps=2, batch_size=4,
               lr=1e-3, val_fraction=0.25, export=False, resume=False)
    return tmp, cfg


def run_cli(tiny_run, name: str, *flags: str, env_extra: dict | None = None):
    tmp, cfg = tiny_run
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "out": str(tmp / name)}))
    log = tmp / f"{name}.log"
    env = clean_env(ALLOC_TEST_LOG=str(log), PYTHONPATH=os.pathsep.join([str(tmp / "hook"), str(REPO)]),
                    **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(path), "--json", *flags],
                          capture_output=True, text=True, env=env, timeout=300)
    starts = [line.split() for line in log.read_text().splitlines()]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, starts, events, tmp / name


def _summary_allocator(run_dir, expected):
    summary = json.loads((run_dir / "summary.json").read_text())
    if "allocator" not in summary:
        pytest.skip("summary.json has no allocator field yet (trainer.py not wired)")
    assert summary["allocator"] == expected


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc"])
def test_cli_reexecutes_once_with_the_chosen_library(tiny_run, name):
    require_library(name)
    proc, starts, events, run_dir = run_cli(tiny_run, f"re-{name}", "--allocator", name)
    assert proc.returncode == 0, proc.stderr
    # Two interpreter starts, one pid: the second on the chosen allocator; no third.
    assert len(starts) == 2 and starts[0][0] == starts[1][0], starts
    assert starts[0][1] == "glibc" and starts[1][1] == name
    assert not [e for e in events if e["event"] == "warning"]
    _summary_allocator(run_dir, name)


def test_cli_auto_picks_the_first_installed(tiny_run):
    expected = next((a for a in allocator.AUTO_ORDER if find_library(a)), None)
    if expected is None:
        require_library(allocator.AUTO_ORDER[0])
    proc, starts, _, _ = run_cli(tiny_run, "auto")
    assert proc.returncode == 0, proc.stderr
    assert [s[1] for s in starts] == ["glibc", expected]


def test_cli_allocator_glibc_skips_the_reexec(tiny_run):
    proc, starts, events, run_dir = run_cli(tiny_run, "glibc", "--allocator", "glibc")
    assert proc.returncode == 0, proc.stderr
    assert [s[1] for s in starts] == ["glibc"]
    assert not [e for e in events if e["event"] == "warning"]
    _summary_allocator(run_dir, "glibc")


def test_cli_allocator_glibc_removes_a_preloaded_allocator(tiny_run):
    path = require_library("tcmalloc")
    proc, starts, _, _ = run_cli(tiny_run, "unload", "--allocator", "glibc", env_extra={"LD_PRELOAD": path})
    assert proc.returncode == 0, proc.stderr
    assert [s[1] for s in starts] == ["tcmalloc", "glibc"]


def test_cli_without_the_library_warns_and_trains_on_glibc(tiny_run):
    proc, starts, events, run_dir = run_cli(tiny_run, "missing", "--allocator", "tcmalloc",
                                            env_extra={"ALLOC_TEST_NO_LIBS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert [s[1] for s in starts] == ["glibc"]
    [warning] = [e for e in events if e["event"] == "warning"]
    assert "--allocator tcmalloc" in warning["message"] and "not found" in warning["message"]
    assert events[-1]["event"] == "done"


def test_cli_inside_another_program_never_reexecutes(tiny_run, monkeypatch):
    """click's test runner (or a script calling main()) cannot be re-executed: it warns for an explicit choice."""
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("execve called"))
    tmp, cfg = tiny_run
    path = tmp / "inproc.yaml"
    path.write_text(yaml.safe_dump({**cfg, "out": str(tmp / "inproc"), "allocator": "jemalloc"}))
    from edge_alast.cli.main import main

    result = CliRunner().invoke(main, ["train", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    current = allocator_in_use()
    if current != "jemalloc":
        assert events[0] == {"event": "warning",
                             "message": f"--allocator jemalloc: cannot switch inside this program, running on "
                                        f"{current}"}


# ---------------------------------------------------------------- config and cost model


def test_config_choices_match_the_module():
    from edge_alast.config import ALLOCATORS, TrainConfig

    assert ALLOCATORS == allocator.CHOICES
    assert TrainConfig(data="d", out="o").allocator == "auto"
    assert "allocator" in TrainConfig.RESUME_FREE  # the allocator does not change what a run computes


def test_slack_is_looked_up_per_allocator():
    from edge_alast.device.costmodel import ALLOCATOR_SLACK, allocator_slack

    for name, (plain, adapters) in ALLOCATOR_SLACK.items():
        assert allocator_slack(False, name) == plain and allocator_slack(True, name) == adapters
    assert allocator_slack(True, "system") == ALLOCATOR_SLACK["glibc"][1]  # unknown: glibc's (the largest)
    assert allocator_slack(False) == allocator_slack(False, allocator_in_use())
