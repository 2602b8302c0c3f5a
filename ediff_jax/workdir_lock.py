"""One writer per workdir: a lock file with a heartbeat, so a second trainer is refused.

Two trainers on one workdir interleave checkpoints, metrics and sample grids and ruin the
run without any error. `WorkdirLock` keeps `WORKDIR/lock.json` for the length of a run:

    with WorkdirLock(workdir, lease_seconds=300, heartbeat_seconds=30,
                     take_over=config.train.take_over_workdir,
                     process_index=jax.process_index()) as lock:
        ...  # the train loop; `lock.lost` turns True if another run took the workdir over

The file names its holder (host, pid, process start time, command line), carries a unique
token and a heartbeat time that a daemon thread refreshes. A second trainer is refused with
`WorkdirLockedError`, which names the holder and the ways out, unless the lock is stale:

* its heartbeat is older than `lease_seconds` (holder hung, or its host lost), or
* the holder ran on this machine and its process is gone (kill -9, OOM kill): no waiting.
  "This machine" means same host name, kernel boot and pid namespace (host name alone
  where /proc is missing), so containers that share a host name never judge each other's pids.

A stale lock is replaced with a `WorkdirLockWarning` naming whose lock it was; so is a live
one when `take_over=True`. The displaced holder's heartbeat thread notices the lock is no
longer its own, stops refreshing it (it never writes over the new holder) and sets `lost`.

Local filesystems get exact semantics: the lock file appears complete and at once through
os.link of a written temporary file (O_CREAT|O_EXCL where links are unsupported), a lock is
only broken after moving it aside by rename and checking it is the very file judged stale,
and the heartbeat writes through the holder's own file descriptor, so it can only ever touch
the file it created. Remote paths (gs://... through `etils.epath`) offer no create-if-absent,
so there the lock is best-effort: write, wait `settle_seconds`, read back and keep the lock
only if our token is still there; two runs racing past that leave the later writer holding,
and the other one finds out (`lost`) at its next heartbeat.

Times are wall-clock seconds compared across hosts, so a lease must exceed any clock skew
between them, and several heartbeats (the thread needs the GIL to beat).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
import warnings
from typing import Any

from etils import epath

LOCK_NAME = "lock.json"
TAKE_OVER_FLAG = "--config.train.take_over_workdir=True"
_FORMAT_VERSION = 1
_MAX_COMMAND_CHARS = 2000
_REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://", "http://", "https://")


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir; the message names it and the ways out."""

    def __init__(self, message: str, holder: LockHolder | None = None, lock_path: str = ""):
        super().__init__(message)
        self.holder = holder
        self.lock_path = lock_path


class WorkdirLockWarning(UserWarning):
    """A lock was replaced (stale or taken over), or this run lost its own lock."""


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """What the lock file records: enough for a person to find and stop the holder."""

    host: str
    pid: int
    process_started: float | None  # epoch seconds; with pid, tells a live holder from a reused pid
    token: str  # unique per acquisition: identifies the lock, not just the process
    command: str
    heartbeat: float  # epoch seconds of the last refresh
    machine: str = ""  # kernel boot id and pid namespace: where `pid` can be checked
    # The kernel's own start time of `pid` in clock ticks since boot (/proc/PID/stat field 22): exact, and
    # unlike `process_started` it does not move when the wall clock is stepped.
    process_start_ticks: int | None = None

    def heartbeat_age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def describe(self, now: float | None = None) -> str:
        """One line for messages: who, since when, last heartbeat, command."""
        started = _format_time(self.process_started) if self.process_started is not None else "unknown"
        command = self.command if len(self.command) <= 300 else self.command[:300] + "..."
        return (f"host {self.host}, pid {self.pid} (process started {started}), last heartbeat "
                f"{_format_age(self.heartbeat_age(now))} ago, command: {command or '?'}")

    def to_json(self) -> str:
        return json.dumps({"version": _FORMAT_VERSION, **dataclasses.asdict(self)}, ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> LockHolder:
        """Parses a lock file; ValueError says what is wrong (empty, truncated, a field missing)."""
        if not text.strip():
            raise ValueError("the file is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"it is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        try:
            holder = cls(host=str(data["host"]), pid=data["pid"], process_started=data.get("process_started"),
                         token=str(data["token"]), command=str(data.get("command", "")),
                         heartbeat=data["heartbeat"], machine=str(data.get("machine", "")),
                         process_start_ticks=data.get("process_start_ticks"))
        except KeyError as e:
            raise ValueError(f"it lacks the field {e}") from None
        if not isinstance(holder.pid, int) or isinstance(holder.pid, bool) or holder.pid <= 0:
            raise ValueError(f"its pid {holder.pid!r} is not a positive integer")
        if not isinstance(holder.heartbeat, (int, float)) or isinstance(holder.heartbeat, bool):
            raise ValueError(f"its heartbeat {holder.heartbeat!r} is not a number")
        if holder.process_started is not None and not isinstance(holder.process_started, (int, float)):
            raise ValueError(f"its process_started {holder.process_started!r} is not a number")
        ticks = holder.process_start_ticks
        if ticks is not None and (not isinstance(ticks, int) or isinstance(ticks, bool)):
            raise ValueError(f"its process_start_ticks {ticks!r} is not an integer")
        if not holder.token:
            raise ValueError("its token is empty")
        return holder


def lock_path(workdir: str | os.PathLike) -> epath.Path:
    path = epath.Path(workdir)
    return (path.expanduser() if _is_local(path) else path) / LOCK_NAME


def read_holder(workdir: str | os.PathLike) -> LockHolder | None:
    """The workdir's current lock holder, None when unlocked; ValueError if the file is unreadable."""
    text = _read_text(lock_path(workdir))
    return None if text is None else LockHolder.from_json(text)


class WorkdirLock:
    """Context manager holding `WORKDIR/lock.json` for one run (see the module docstring).

    Raises `WorkdirLockedError` on entry if a live run holds the workdir and `take_over` is
    False. Processes with `process_index != 0` of a multi-host job do nothing: the job has one
    lock, taken by process 0 (which is also the one that writes logs and sample grids).
    """

    def __init__(self, workdir: str | os.PathLike, *, lease_seconds: float = 300.0, heartbeat_seconds: float = 30.0,
                 take_over: bool = False, process_index: int = 0, settle_seconds: float = 2.0):
        if heartbeat_seconds <= 0:
            raise ValueError(f"heartbeat_seconds={heartbeat_seconds} must be positive.")
        if lease_seconds <= heartbeat_seconds:
            raise ValueError(f"lease_seconds={lease_seconds} must exceed heartbeat_seconds={heartbeat_seconds} "
                             "(several heartbeats), or a live holder would look stale between two of them.")
        self.path = lock_path(workdir)
        self.lease_seconds = float(lease_seconds)
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.take_over = bool(take_over)
        self.settle_seconds = float(settle_seconds)
        self.enabled = process_index == 0
        self.holder: LockHolder | None = None  # our own record while we hold the lock
        self.lost_reason: str | None = None
        self._local = _is_local(self.path)
        self._fd: int | None = None  # local: open on the inode we created; the heartbeat writes only there
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of that inode
        self._size = 0  # bytes written so far; records are padded to never shrink (no stale tail)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io_warned = False

    @property
    def lost(self) -> bool:
        """True once another run replaced our lock (take-over or stale break): stop writing."""
        return self.lost_reason is not None

    @property
    def held(self) -> bool:
        return self.holder is not None and not self.lost

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def acquire(self) -> WorkdirLock:
        """Takes the lock or raises WorkdirLockedError; replaces a stale (or, with take_over, any) lock."""
        if not self.enabled:
            return self
        if self.holder is not None:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock.")
        self.lost_reason, self._io_warned = None, False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = LockHolder(host=_HOST, pid=os.getpid(), process_started=_own_start_time(), token=uuid.uuid4().hex,
                        command=_command_line(), heartbeat=time.time(), machine=_MACHINE,
                        process_start_ticks=_start_ticks(os.getpid()))
        replaced = self._acquire_local(me) if self._local else self._acquire_remote(me)
        self.holder = me
        if replaced is not None:
            previous, why = replaced
            warnings.warn(f"Replaced the lock of {self.path.parent}: {why}. Previous holder: {previous}.",
                          WorkdirLockWarning, stacklevel=3)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file, only if it is still ours."""
        if self.holder is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        try:
            if not self.lost:
                if self._local:
                    assert self._ident is not None
                    _remove_if_same(os.fspath(self.path), f"{os.fspath(self.path)}.{self.holder.token}.released",
                                    self._ident)
                else:
                    current = _parse_or_none(_read_text(self.path))
                    if current is not None and current.token == self.holder.token:
                        self.path.unlink(missing_ok=True)
        finally:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
            self.holder = None

    # Acquisition. Both return (previous holder's description, why it was replaced) or None.

    def _acquire_local(self, me: LockHolder) -> tuple[str, str] | None:
        lock = os.fspath(self.path)
        tmp = f"{lock}.{me.token}.tmp"
        data = me.to_json().encode()
        replaced = None
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
            for _ in range(50):  # each round loses only to another process making progress
                kept = _create_exclusive(lock, tmp, fd, data)
                if kept is not None:
                    self._fd = kept
                    st = os.fstat(kept)
                    self._ident, self._size = (st.st_dev, st.st_ino), len(data)
                    return replaced
                seen = _observe_local(lock)
                if seen is None:
                    continue  # released in between: try again
                why = self._why_replaceable(seen)
                if why is None:
                    raise self._locked_error(seen)
                aside = f"{lock}.{me.token}.broken"
                if _remove_if_same(lock, aside, seen.ident, seen.raw):
                    replaced = (seen.describe(), why)
            raise WorkdirLockedError(f"Could not take the lock {lock}: other processes keep replacing it.",
                                     lock_path=lock)
        finally:
            if fd != self._fd:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _acquire_remote(self, me: LockHolder) -> tuple[str, str] | None:
        replaced = None
        seen = _observe_remote(self.path)
        if seen is not None:
            why = self._why_replaceable(seen)
            if why is None:
                raise self._locked_error(seen)
            replaced = (seen.describe(), why)
        self.path.write_text(me.to_json())
        self._settle()
        now = _observe_remote(self.path)
        if now is None or now.holder is None or now.holder.token != me.token:
            if now is None:
                raise WorkdirLockedError(f"The lock {self.path} vanished while being taken; rerun.",
                                         lock_path=os.fspath(self.path))
            raise self._locked_error(now, race=True)
        return replaced

    def _settle(self) -> None:
        """Remote only: a racing writer's file lands in this window; then we read back who won."""
        time.sleep(self.settle_seconds)

    def _why_replaceable(self, seen: _Observed) -> str | None:
        """Why `seen` may be replaced (stale, or take_over), or None when it must be respected."""
        age = time.time() - seen.last_write
        if seen.holder is None:
            if age > self.lease_seconds:
                return f"the lock file was unreadable ({seen.problem}) and unchanged for {_format_age(age)}"
        else:
            h = seen.holder
            if age > self.lease_seconds:
                return f"its heartbeat stopped {_format_age(age)} ago (lease {_format_age(self.lease_seconds)})"
            if h.host == _HOST and h.machine == _MACHINE and not _pid_alive(h.pid, h.process_started,
                                                                            h.process_start_ticks):
                return f"its process {h.pid} is no longer running on this machine"
        if self.take_over:
            return "take_over was requested for a live lock"
        return None

    def _locked_error(self, seen: _Observed, race: bool = False) -> WorkdirLockedError:
        where = self.path.parent
        lease = _format_age(self.lease_seconds)
        if seen.holder is None:
            age = time.time() - seen.last_write
            message = (f"Workdir {where} has an unreadable lock file {self.path} ({seen.problem}), last written "
                       f"{_format_age(age)} ago. It is replaced once unchanged for {lease}; if no trainer uses this "
                       f"workdir, rerun then, delete the file, or pass {TAKE_OVER_FLAG}.")
        else:
            h = seen.holder
            lead = ("Another trainer took workdir {where} at the same moment" if race
                    else "Workdir {where} is in use by another trainer").format(where=where)
            message = (f"{lead}: {seen.describe()}. Only one run may write a workdir (two would interleave "
                       f"checkpoints). Wait for that run to finish, stop it (kill {h.pid} on {h.host}), or pass "
                       f"{TAKE_OVER_FLAG} to take the workdir over (that run then finds its lock lost; make sure it "
                       f"is stopped or hung). A lock without a heartbeat for {lease} is replaced automatically.")
        return WorkdirLockedError(message, holder=seen.holder, lock_path=os.fspath(self.path))

    # Heartbeat.

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not (self._beat_local() if self._local else self._beat_remote()):
                    return
            except Exception as e:  # noqa: BLE001 - a flaky filesystem must not kill the run; retry next beat
                if not self._io_warned:
                    self._io_warned = True
                    warnings.warn(f"Could not refresh the workdir lock {self.path} ({type(e).__name__}: {e}); "
                                  "retrying.", WorkdirLockWarning)

    def _beat_local(self) -> bool:
        """Refreshes the heartbeat through our descriptor; False (and `lost`) once the file is not ours."""
        assert self.holder is not None and self._fd is not None
        lock = os.fspath(self.path)
        ident = None
        for attempt in range(2):
            try:
                st = os.stat(lock)
                ident = (st.st_dev, st.st_ino)
                break
            except FileNotFoundError:
                if attempt == 0:  # another process may be restoring a lock it moved aside by mistake
                    self._stop.wait(min(0.05, self.heartbeat_seconds / 4))
        if ident != self._ident:
            seen = _observe_local(lock)
            self._set_lost("the lock file was deleted" if seen is None else f"the lock now belongs to {seen.describe()}")
            return False
        # Writes land in our inode even if the path was replaced since the check: never in another's lock.
        self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
        data = self.holder.to_json().encode().ljust(self._size)
        os.pwrite(self._fd, data, 0)
        self._size = len(data)
        return True

    def _beat_remote(self) -> bool:
        assert self.holder is not None
        seen = _observe_remote(self.path)
        if seen is None or seen.holder is None or seen.holder.token != self.holder.token:
            self._set_lost("the lock file was deleted" if seen is None else f"the lock now belongs to {seen.describe()}")
            return False
        self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
        self.path.write_text(self.holder.to_json())  # best-effort: see the module docstring
        return True

    def _set_lost(self, reason: str) -> None:
        self.lost_reason = reason
        warnings.warn(f"This run no longer holds the workdir lock {self.path}: {reason}. Stop writing to "
                      f"{self.path.parent}.", WorkdirLockWarning)


@dataclasses.dataclass(frozen=True)
class _Observed:
    """A lock file as read: the holder, or why it could not be parsed, and when it was last written."""

    holder: LockHolder | None
    problem: str | None
    last_write: float  # the heartbeat, or the file's mtime when unreadable
    raw: bytes = b""
    ident: tuple[int, int] = (0, 0)

    def describe(self) -> str:
        if self.holder is not None:
            return self.holder.describe()
        return f"an unreadable lock file ({self.problem}) last written {_format_age(time.time() - self.last_write)} ago"


def _observe_local(lock: str) -> _Observed | None:
    """Reads the lock with its inode; retries briefly a file caught empty or mid-write."""
    for attempt in range(3):
        try:
            with open(lock, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return None
        ident = (st.st_dev, st.st_ino)
        try:
            holder = LockHolder.from_json(raw.decode("utf-8", errors="replace"))
            return _Observed(holder, None, holder.heartbeat, raw, ident)
        except ValueError as e:
            problem = str(e)
        if attempt < 2:
            time.sleep(0.02)
    return _Observed(None, problem, st.st_mtime, raw, ident)


def _observe_remote(path: epath.Path) -> _Observed | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        holder = LockHolder.from_json(text)
        return _Observed(holder, None, holder.heartbeat)
    except ValueError as e:
        try:
            mtime = float(path.stat().mtime)
        except Exception:  # noqa: BLE001 - no mtime: count the lease from now (refused, never taken)
            mtime = time.time()
        return _Observed(None, str(e), mtime)


def _create_exclusive(lock: str, tmp: str, tmp_fd: int, data: bytes) -> int | None:
    """Makes `lock` appear complete and only if absent: a hard link to the written `tmp`.

    Returns a descriptor open on the lock's inode (`tmp_fd` itself when linked), or None if a
    lock exists. Filesystems
    without hard links fall back to O_CREAT|O_EXCL and a write, where a crash in between
    leaves an empty file (handled as an unreadable lock).
    """
    try:
        os.link(tmp, lock)
        return tmp_fd
    except FileExistsError:
        return None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK):
            raise
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    os.write(fd, data)
    os.fsync(fd)
    return fd


def _remove_if_same(lock: str, aside: str, ident: tuple[int, int], raw: bytes | None = None) -> bool:
    """Removes `lock` only if it is still the file judged (same inode and, if given, same bytes).

    Moving it aside first makes the check and the removal one step for other processes: a
    file checked and then unlinked by path could meanwhile have become someone else's lock.
    A wrong file moved aside is linked back. True when the judged file is gone from `lock`.
    """
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True
    try:
        with open(aside, "rb") as f:
            st = os.fstat(f.fileno())
            same = (st.st_dev, st.st_ino) == ident and (raw is None or f.read() == raw)
        if not same:
            try:
                os.link(aside, lock)
            except FileExistsError:
                pass  # a third process locked meanwhile; the file's owner sees it lost at its next heartbeat
        return same
    finally:
        os.unlink(aside)


def _read_text(path: epath.Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _parse_or_none(text: str | None) -> LockHolder | None:
    try:
        return None if text is None else LockHolder.from_json(text)
    except ValueError:
        return None


def _is_local(path: epath.Path) -> bool:
    return not os.fspath(path).startswith(_REMOTE_PREFIXES)


def _pid_alive(pid: int, started: float | None, start_ticks: int | None = None) -> bool:
    """Whether `pid` on this machine still is the process that wrote the lock (not a zombie or a reused pid).

    The start time in clock ticks since boot decides when the lock has it (same `machine`: same boot).
    Locks from before it compare epoch start times within 2 s; those are boot time + ticks, and boot
    time as /proc/stat reports it moves when the wall clock is stepped, so a live holder could read
    as a reused pid (and its lock be replaced) in a process that started before the step.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return True  # cannot tell: the lease decides
    info = _proc_stat(pid)
    if info is None:
        return True
    state, proc_started = info
    if state in "ZX":
        return False  # killed, not yet reaped by its parent
    if start_ticks is not None:
        ticks = _start_ticks(pid)
        return ticks is None or ticks == start_ticks
    return started is None or abs(proc_started - started) < 2.0


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """(state, start time in epoch seconds) from /proc (Linux), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], _BOOT_TIME + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _boot_time() -> float:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _machine_id() -> str:
    """Kernel boot and pid namespace: two processes can check each other's pids only if both match."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        return ""
    return "/".join(parts)


def _start_ticks(pid: int) -> int | None:
    """The kernel's start time of `pid` in clock ticks since boot (Linux), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _own_start_time() -> float:
    info = _proc_stat(os.getpid())
    return _IMPORTED if info is None else info[1]


def _command_line() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = [sys.executable, *sys.argv]
    command = shlex.join(argv).replace("\r", "\\r").replace("\n", "\\n")  # one line in messages
    return command if len(command) <= _MAX_COMMAND_CHARS else command[:_MAX_COMMAND_CHARS] + "..."


def _format_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _format_age(seconds: float) -> str:
    if seconds < 0:
        return f"{seconds:.1f} s (in the future: clocks differ)"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


_IMPORTED = time.time()
_HOST = socket.gethostname()
_BOOT_TIME = _boot_time()
_MACHINE = _machine_id()
