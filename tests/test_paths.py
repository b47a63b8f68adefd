"""Output paths checked before any work, and one process per run directory or dataset build."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from trm import paths

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from trm import paths
    with paths.exclusive(Path(sys.argv[1]), "test"):
        print("held", flush=True)
        sys.stdin.readline()
""")


@pytest.fixture
def holder(tmp_path):
    """A second process holding a directory until the test lets it go."""
    procs = []

    def hold(directory):
        directory.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.communicate("\n", timeout=30)


def test_a_held_directory_names_its_holder_and_is_free_when_the_holder_ends(tmp_path, holder):
    proc = holder(tmp_path / "run")
    with pytest.raises(paths.Busy, match=rf"in use by process {proc.pid} on .*since"):
        with paths.exclusive(tmp_path / "run", "one run per directory"):
            pass
    proc.communicate("\n", timeout=30)
    assert not (tmp_path / "run" / paths.LOCK).exists()  # removed on release
    with paths.exclusive(tmp_path / "run", "test"):
        assert (tmp_path / "run" / paths.LOCK).exists()


def test_a_killed_holder_leaves_the_directory_free(tmp_path, holder):
    proc = holder(tmp_path / "run")
    proc.kill()
    proc.wait(timeout=30)
    assert (tmp_path / "run" / paths.LOCK).exists()  # the file stays, the kernel's lock does not
    with paths.exclusive(tmp_path / "run", "test"):
        pass


def test_waiting_for_a_holder_returns_once_it_is_done(tmp_path, holder):
    proc = holder(tmp_path / "data")
    told = []
    started = time.monotonic()
    release = subprocess.Popen(["sh", "-c", f"sleep 1; kill {proc.pid}"])
    with paths.exclusive(tmp_path / "data", "test", wait=True, on_wait=told.append):
        waited = time.monotonic() - started
    release.wait()
    assert waited >= 0.9 and len(told) == 1 and str(proc.pid) in told[0]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: t / "file.txt", "is not a directory"),
        (lambda t: t / "missing" / "deeper" / "x.png", "does not exist"),
        (lambda t: t, "is a directory"),
    ],
)
def test_check_file_refuses_what_cannot_be_written(tmp_path, make, message):
    (tmp_path / "file.txt").write_text("x")
    target = make(tmp_path)
    if message == "is not a directory":
        target = target / "x.json"
    with pytest.raises(paths.PathProblem, match=message):
        paths.check_file("--json", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing created


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_directory_that_exists_but_takes_no_files_is_refused():
    """/proc: root passes os.access() there, but nothing can be created in it."""
    with pytest.raises(paths.PathProblem, match="cannot create anything in /proc"):
        paths.check_dir("--out", paths.Path("/proc/trm-run"))
    with pytest.raises(paths.PathProblem, match="cannot create anything in /proc"):
        paths.check_file("--png", paths.Path("/proc/x.png"))


def test_a_held_directory_made_for_nothing_is_removed_and_one_with_work_is_kept(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with paths.held_directory("--out", tmp_path / "a", "test"):
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()
    with pytest.raises(KeyboardInterrupt):
        with paths.held_directory("--out", tmp_path / "b", "test"):
            (tmp_path / "b" / "checkpoint.safetensors").write_text("work")
            raise KeyboardInterrupt
    assert (tmp_path / "b" / "checkpoint.safetensors").exists()
    with pytest.raises(ValueError):
        with paths.held_directory("--out", tmp_path / "c", "test", discard_partial=True):
            (tmp_path / "c" / "half-built.npy").write_text("x")
            raise ValueError("bad row")
    assert not (tmp_path / "c").exists()
