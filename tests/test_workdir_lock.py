"""One writer per workdir: real processes contend for, crash with and take over the lock.

The lock logic is plain Python, so these tests use tiny leases and heartbeats and never
import JAX in the helper processes.
"""

from __future__ import annotations

import json
import os
import shlex
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ediff_jax import workdir_lock
from ediff_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError, WorkdirLockWarning, read_holder

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

# A trainer stand-in: takes the lock, says so, holds it until `stop` exists; reports a lost lock.
HOLDER = r"""
import os, sys, time, warnings
from ediff_jax.workdir_lock import WorkdirLock, WorkdirLockedError
workdir, stop, lease, beat, take_over = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
go = os.path.join(os.path.dirname(stop), "go")
print("ready", flush=True)
while len(sys.argv) > 6 and not os.path.exists(go):  # start barrier for races
    time.sleep(0.001)
warnings.simplefilter("ignore")
try:
    with WorkdirLock(workdir, lease_seconds=lease, heartbeat_seconds=beat, take_over=take_over) as lock:
        print("acquired", flush=True)
        reported = False
        while not os.path.exists(stop):
            if lock.lost and not reported:
                print("lost", flush=True)
                reported = True
            time.sleep(0.005)
except WorkdirLockedError as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(3)
print("released", flush=True)
"""


class Holder:
    """A helper process running HOLDER; `stop()` makes it leave its `with` block cleanly."""

    def __init__(self, tmp_path: Path, workdir: Path, name: str, lease: float = 60.0, beat: float = 0.05,
                 take_over: bool = False, barrier: bool = False):
        self.stop_file = tmp_path / f"stop-{name}"
        args = [str(workdir), str(self.stop_file), str(lease), str(beat), "1" if take_over else "0"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, *args, *(["barrier"] if barrier else [])],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
        self.pid = self.proc.pid
        self.out = b""

    def wait_for(self, word: str, timeout: float = 30.0) -> bool:
        """True once the process printed `word`; False if it exited first."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while word.encode() not in self.out.split():
            left = deadline - time.monotonic()
            assert left > 0, f"pid {self.pid} did not print {word!r}; output {self.out!r}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return word.encode() in self.out.split()
                self.out += chunk
        return True

    def stop(self) -> int:
        self.stop_file.touch()
        return self.proc.wait(timeout=30)

    def stderr(self) -> str:
        return self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def holders(tmp_path):
    started: list[Holder] = []

    def start(workdir: Path, name: str, **kwargs) -> Holder:
        h = Holder(tmp_path, workdir, name, **kwargs)
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()
        h.proc.stdout.close()
        h.proc.stderr.close()


def write_lock(workdir: Path, **fields) -> None:
    """A lock file as another process would have left it."""
    record = dict(version=1, host="other-host", pid=12345, process_started=time.time() - 100, token="theirs",
                  command="python -m ediff_jax.train --workdir elsewhere", heartbeat=time.time(), machine="m")
    record.update(fields)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / LOCK_NAME).write_text(json.dumps(record))


def test_second_process_refused_until_first_exits(tmp_path, holders):
    workdir = tmp_path / "run"
    first = holders(workdir, "first")
    assert first.wait_for("acquired")
    second = holders(workdir, "second")
    assert second.proc.wait(timeout=30) == 3
    message = second.stderr()
    assert f"host {HOST}, pid {first.pid} (process started " in message
    assert "last heartbeat" in message and "ago" in message
    assert f"kill {first.pid} on {HOST}" in message and "--config.train.take_over_workdir=True" in message
    assert message.count("\n") == 1  # one message, no traceback
    assert read_holder(workdir).pid == first.pid

    assert first.stop() == 0
    assert first.wait_for("released")
    assert not (workdir / LOCK_NAME).exists()
    assert sorted(p.name for p in workdir.iterdir()) == []  # no temporary files left either
    with WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=0.05) as lock:
        assert read_holder(workdir).token == lock.holder.token
    assert not (workdir / LOCK_NAME).exists()


def test_lock_released_on_exception_and_heartbeat_advances(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ZeroDivisionError):
        with WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=0.02):
            first = read_holder(workdir).heartbeat
            deadline = time.monotonic() + 10
            while read_holder(workdir).heartbeat == first:
                assert time.monotonic() < deadline, "heartbeat never refreshed"
                time.sleep(0.01)
            holder = read_holder(workdir)
            assert (holder.host, holder.pid) == (HOST, os.getpid())
            # the command is this process's own (pytest, or an xdist worker's bootstrap)
            own = [a.decode() for a in open("/proc/self/cmdline", "rb").read().split(b"\0") if a]
            assert holder.process_started <= time.time() and holder.command == shlex.join(own)
            1 / 0
    assert not (workdir / LOCK_NAME).exists()


def test_kill_9_lock_taken_over_at_once(tmp_path, holders):
    workdir = tmp_path / "run"
    victim = holders(workdir, "victim")
    assert victim.wait_for("acquired")
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait(timeout=30)
    assert read_holder(workdir).pid == victim.pid  # left behind, heartbeat still fresh
    # A lease of an hour: only the dead-pid rule can allow this.
    with pytest.warns(WorkdirLockWarning, match=rf"process {victim.pid} is no longer running.*pid {victim.pid}"):
        with WorkdirLock(workdir, lease_seconds=3600, heartbeat_seconds=1) as lock:
            assert read_holder(workdir).token == lock.holder.token


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="zombie detection reads /proc")
def test_killed_but_unreaped_holder_is_dead(tmp_path, holders):
    workdir = tmp_path / "run"
    victim = holders(workdir, "victim")
    assert victim.wait_for("acquired")
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.warns(WorkdirLockWarning, match=f"process {victim.pid} is no longer running"):
        with WorkdirLock(workdir, lease_seconds=3600, heartbeat_seconds=1):
            pass


def test_other_host_lock_refused_until_lease_expires(tmp_path):
    workdir = tmp_path / "run"
    write_lock(workdir, heartbeat=time.time())
    with pytest.raises(WorkdirLockedError, match=r"host other-host, pid 12345 .*last heartbeat \d"):
        WorkdirLock(workdir, lease_seconds=0.5, heartbeat_seconds=0.1).acquire()
    assert read_holder(workdir).token == "theirs"  # refusal leaves the lock alone
    time.sleep(0.6)
    with pytest.warns(WorkdirLockWarning, match=r"heartbeat stopped .* host other-host, pid 12345"):
        with WorkdirLock(workdir, lease_seconds=0.5, heartbeat_seconds=0.1) as lock:
            assert read_holder(workdir).token == lock.holder.token


def test_pid_rule_only_within_one_machine(tmp_path):
    """A dead pid under our host name but another kernel or pid namespace proves nothing."""
    workdir = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(workdir, host=HOST, pid=dead.pid, machine="another-boot/pid:[1]")
    with pytest.raises(WorkdirLockedError, match=f"pid {dead.pid}"):
        WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=1).acquire()


def test_reused_pid_counts_as_dead(tmp_path):
    """Our own (live) pid with another start time: the holder is gone and its pid reused."""
    workdir = tmp_path / "run"
    write_lock(workdir, host=HOST, pid=os.getpid(), process_started=1000.0, machine=workdir_lock._MACHINE)
    with pytest.warns(WorkdirLockWarning, match="no longer running"):
        with WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=1):
            pass
    write_lock(workdir, host=HOST, pid=os.getpid(), process_started=workdir_lock._own_start_time(),
               machine=workdir_lock._MACHINE)
    with pytest.raises(WorkdirLockedError):
        WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=1).acquire()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="start ticks are read from /proc")
def test_a_live_holder_is_respected_after_the_wall_clock_steps(tmp_path, holders, monkeypatch):
    """Boot time as /proc/stat gives it moves when the wall clock is stepped (seen under heavy load in
    CI), so epoch start times of one live process disagree between processes that read it before
    and after the step. The kernel's start ticks do not: a live holder is still refused."""
    workdir = tmp_path / "run"
    live = holders(workdir, "live")
    assert live.wait_for("acquired")
    assert read_holder(workdir).process_start_ticks == workdir_lock._start_ticks(live.pid)
    monkeypatch.setattr(workdir_lock, "_BOOT_TIME", workdir_lock._BOOT_TIME + 5.0)  # this process: before a step
    with pytest.raises(WorkdirLockedError, match=f"pid {live.pid}"):
        WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=1).acquire()
    # a reused pid (same pid, other start ticks) still counts as dead
    write_lock(workdir, host=HOST, pid=live.pid, process_started=read_holder(workdir).process_started,
               process_start_ticks=workdir_lock._start_ticks(live.pid) - 100, machine=workdir_lock._MACHINE)
    with pytest.warns(WorkdirLockWarning, match="no longer running"):
        with WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=1):
            pass


def test_take_over_live_lock_old_holder_stops(tmp_path, holders):
    workdir = tmp_path / "run"
    old = holders(workdir, "old", beat=0.02)
    assert old.wait_for("acquired")
    lock = WorkdirLock(workdir, lease_seconds=7200, heartbeat_seconds=3600, take_over=True)
    with pytest.warns(WorkdirLockWarning, match=rf"take_over was requested.*pid {old.pid}"):
        lock.acquire()
    try:
        assert old.wait_for("lost")
        snapshot = (workdir / LOCK_NAME).read_bytes()
        time.sleep(0.3)  # many of the old holder's heartbeats; ours is an hour away
        assert (workdir / LOCK_NAME).read_bytes() == snapshot
        assert read_holder(workdir).token == lock.holder.token
        assert old.stop() == 0  # leaving its `with` must not delete our lock
        assert read_holder(workdir).token == lock.holder.token
    finally:
        lock.release()
    assert not (workdir / LOCK_NAME).exists()


def test_take_over_in_process_sets_lost(tmp_path):
    workdir = tmp_path / "run"
    old = WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=0.02).acquire()
    with pytest.warns(WorkdirLockWarning):
        new = WorkdirLock(workdir, lease_seconds=7200, heartbeat_seconds=3600, take_over=True).acquire()
        deadline = time.monotonic() + 10
        while not old.lost:
            assert time.monotonic() < deadline, "the old holder never noticed"
            time.sleep(0.01)
    assert "now belongs to" in old.lost_reason and not old.held and new.held
    old.release()
    assert read_holder(workdir).token == new.holder.token
    new.release()
    assert not (workdir / LOCK_NAME).exists()


def test_displaced_holder_release_keeps_new_lock(tmp_path):
    """The displaced run exits before its heartbeat noticed: its exit must still spare the new lock."""
    workdir = tmp_path / "run"
    old = WorkdirLock(workdir, lease_seconds=7200, heartbeat_seconds=3600).acquire()
    with pytest.warns(WorkdirLockWarning):
        new = WorkdirLock(workdir, lease_seconds=7200, heartbeat_seconds=3600, take_over=True).acquire()
    old.release()
    assert read_holder(workdir).token == new.holder.token
    new.release()
    assert not (workdir / LOCK_NAME).exists()


def test_stale_break_spares_a_lock_taken_meanwhile(tmp_path, monkeypatch):
    """A rival breaks the stale lock between our read and our break: we must not remove its lock."""
    workdir = tmp_path / "run"
    write_lock(workdir, heartbeat=time.time() - 100)
    rival = WorkdirLock(workdir, lease_seconds=30, heartbeat_seconds=10)
    real_observe = workdir_lock._observe_local

    def observe_then_rival_wins(lock: str):
        seen = real_observe(lock)
        if seen is not None and seen.holder is not None and seen.holder.token == "theirs":
            monkeypatch.setattr(workdir_lock, "_observe_local", real_observe)
            with pytest.warns(WorkdirLockWarning):
                rival.acquire()
        return seen

    monkeypatch.setattr(workdir_lock, "_observe_local", observe_then_rival_wins)
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
        WorkdirLock(workdir, lease_seconds=30, heartbeat_seconds=10).acquire()
    try:
        assert read_holder(workdir).token == rival.holder.token
    finally:
        rival.release()
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_concurrent_starts_exactly_one_wins(tmp_path, holders, stale):
    """Racing processes on an empty workdir, or on one stale lock they all want to break."""
    workdir = tmp_path / "run"
    if stale:
        write_lock(workdir, heartbeat=time.time() - 100)
    racers = [holders(workdir, f"r{i}", lease=30, barrier=True) for i in range(4)]
    for r in racers:
        assert r.wait_for("ready")
    (tmp_path / "go").touch()
    winners = [r for r in racers if r.wait_for("acquired")]
    assert len(winners) == 1, [r.out for r in racers]
    assert all(r.proc.wait(timeout=30) == 3 for r in racers if r not in winners)
    assert read_holder(workdir).pid == winners[0].pid
    assert winners[0].stop() == 0
    assert not (workdir / LOCK_NAME).exists()


def test_other_processes_of_a_job_do_nothing(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with WorkdirLock(workdir, lease_seconds=1, heartbeat_seconds=0.01, process_index=1) as lock:
        time.sleep(0.05)
        assert not lock.lost and lock.holder is None
    assert list(workdir.iterdir()) == []
    write_lock(workdir)  # a live lock elsewhere is process 0's business
    with WorkdirLock(workdir, lease_seconds=1, heartbeat_seconds=0.01, process_index=3):
        pass
    assert read_holder(workdir).token == "theirs"


@pytest.mark.parametrize("content", [b"", b'{"host": "a', b'{"host": "a"}', b"[]"], ids=["empty", "truncated",
                                                                                          "missing", "not-object"])
def test_unreadable_lock_refused_then_stale_after_lease(tmp_path, content):
    """Unreadable (e.g. a crash mid-write): refused while recently written, replaced after the lease.

    It cannot name a holder, so replacing it at once could trample a live writer we cannot
    parse, and refusing forever would need a person to delete it; any live writer keeps
    the file's mtime fresh, so the mtime serves as its heartbeat.
    """
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock_file = workdir / LOCK_NAME
    lock_file.write_bytes(content)
    with pytest.raises(WorkdirLockedError, match=r"unreadable lock file .* last written .* ago"):
        WorkdirLock(workdir, lease_seconds=30, heartbeat_seconds=1).acquire()
    old = time.time() - 60
    os.utime(lock_file, (old, old))
    with pytest.warns(WorkdirLockWarning, match="unreadable"):
        with WorkdirLock(workdir, lease_seconds=30, heartbeat_seconds=1) as lock:
            assert read_holder(workdir).token == lock.holder.token
    lock_file.write_bytes(content)
    with pytest.raises(ValueError):
        read_holder(workdir)


def test_remote_fallback_semantics(tmp_path, monkeypatch):
    """The object-store path (write, settle, read back), exercised on a local directory."""
    monkeypatch.setattr(workdir_lock, "_is_local", lambda path: False)
    workdir = tmp_path / "run"
    first = WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=0.02, settle_seconds=0.01).acquire()
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
        WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=1, settle_seconds=0.01).acquire()
    with pytest.warns(WorkdirLockWarning):
        second = WorkdirLock(workdir, lease_seconds=7200, heartbeat_seconds=3600, settle_seconds=0.01,
                             take_over=True).acquire()
        deadline = time.monotonic() + 10
        while not first.lost:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    first.release()
    assert read_holder(workdir).token == second.holder.token
    second.release()
    assert not (workdir / LOCK_NAME).exists()


def test_lease_must_cover_heartbeats(tmp_path):
    with pytest.raises(ValueError, match="lease_seconds"):
        WorkdirLock(tmp_path, lease_seconds=1, heartbeat_seconds=1)


def test_remote_fallback_loser_of_a_race_is_refused(tmp_path, monkeypatch):
    """Another host's record lands while we wait to read ours back: it won, we are refused."""
    monkeypatch.setattr(workdir_lock, "_is_local", lambda path: False)
    workdir = tmp_path / "run"
    lock = WorkdirLock(workdir, lease_seconds=60, heartbeat_seconds=1, settle_seconds=0.0)
    monkeypatch.setattr(lock, "_settle", lambda: write_lock(workdir, heartbeat=time.time()))
    with pytest.raises(WorkdirLockedError, match="at the same moment: host other-host, pid 12345"):
        lock.acquire()
    assert read_holder(workdir).token == "theirs"


# --- The trainer holds the lock ------------------------------------------------------------

def test_trainer_is_refused_on_a_live_workdir_and_can_take_it_over(shapes_data_dir, tmp_path, holders, monkeypatch):
    """train_and_evaluate on a workdir another live process holds: refused naming its pid,
    nothing written. With take_over_workdir it runs, and the old holder sees `lost`. A run
    whose lock is taken from it stops at once without writing a checkpoint."""
    from ediff_jax import training
    from helpers import tiny_train_config

    workdir = tmp_path / "run"
    other = holders(workdir, "other", lease=600.0, beat=0.05)
    assert other.wait_for("acquired")
    with pytest.raises(WorkdirLockedError, match=rf"pid {other.pid}.*take_over_workdir=True"):
        training.train_and_evaluate(tiny_train_config(shapes_data_dir, ckpt_every=1), workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK_NAME]

    with pytest.warns(WorkdirLockWarning, match="Replaced the lock"):
        training.train_and_evaluate(tiny_train_config(shapes_data_dir, num_steps=1, take_over_workdir=True), workdir)
    assert other.wait_for("lost")
    assert not (workdir / LOCK_NAME).exists()  # released at the end of the run

    taken = tmp_path / "taken"
    monkeypatch.setattr(WorkdirLock, "lost", property(lambda self: True))
    with pytest.warns(UserWarning, match="another run took over"):
        state = training.train_and_evaluate(tiny_train_config(shapes_data_dir, ckpt_every=1), taken)
    assert int(state.step) == 1
    assert not [p for p in (taken / "checkpoints").iterdir() if p.name.isdigit()]


def test_cli_second_trainer_gets_one_line(tmp_path, holders):
    """`python -m ediff_jax.train` on a held workdir: one line naming the holder, no traceback,
    and nothing written into the workdir."""
    workdir = tmp_path / "run"
    other = holders(workdir, "other", lease=600.0, beat=0.05)
    assert other.wait_for("acquired")
    done = subprocess.run([sys.executable, "-m", "ediff_jax.train", "--config", "configs/base64.py:size=tiny",
                           "--workdir", str(workdir)], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"pid {other.pid}" in lines[-1] and "take_over_workdir=True" in lines[-1], done.stderr
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK_NAME]
