"""Orbax checkpoints with named items: `state` (the train state) and `meta` (JSON).

`meta` records what the state belongs to (model config, image size, stage), so a workdir
holding a checkpoint of another model is refused *before* anything is restored or
written: the user's checkpoint is never touched by a mismatched run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from ediff_jax.paths import as_path

# Metadata that legitimately changes during a run (e.g. the current expert phase).
PROGRESS_KEYS = ("progress",)


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint does not fit the model being built."""


class CheckpointReadError(RuntimeError):
    """Reading a checkpoint failed for a reason other than damage to it (memory, I/O, code)."""


# TensorStore statuses of data that is missing, truncated or fails to decode. Anything
# else (RESOURCE_EXHAUSTED, UNAVAILABLE, PERMISSION_DENIED, ...) says nothing about the
# checkpoint, which must then be left alone.
_DAMAGE_STATUSES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION")


def _cause_chain(error: BaseException) -> list[BaseException]:
    """`error` and what caused it, outermost first: orbax wraps the TensorStore error
    that says what happened in a plain Exception."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def damage_reason(error: BaseException) -> str | None:
    """Why `error` shows the checkpoint itself is unreadable, or None if it does not.

    Only deserialisation and integrity errors count: invalid JSON metadata, a missing
    file, or a TensorStore read whose status is one of `_DAMAGE_STATUSES`, anywhere in
    the cause chain.
    """
    for error in _cause_chain(error):
        if isinstance(error, json.JSONDecodeError):
            return f"invalid JSON ({error})"
        if isinstance(error, FileNotFoundError):
            return f"missing file ({error})"
        message = str(error).lstrip()
        for status in _DAMAGE_STATUSES:
            if message.startswith(status + ":"):
                return message.splitlines()[0][:300]
    return None


def _normalise(obj: Any) -> Any:
    """JSON round-trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(obj, default=str))


class Checkpointer:
    """`read_only=True` (sampling, evaluation): nothing inside `checkpoints/` is created,
    cleaned up, renamed or written."""

    def __init__(self, workdir: str | os.PathLike, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False, subdir: str = "checkpoints"):
        """`keep`: newest steps kept (None: all); `subdir`: the folder under the workdir (post-hoc EMA
        snapshots live beside the checkpoints, in `posthoc_ema/`)."""
        self.directory = as_path(workdir) / subdir
        self.read_only = read_only
        with _quiet_orbax_read_only():
            if read_only:
                options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                       save_interval_steps=0)
            else:
                options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                       enable_async_checkpointing=async_save)
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_compatible(self, meta: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> None:
        """Raises CheckpointMismatchError naming the differing keys, if any.

        `saved`: metadata already read (default: the latest checkpoint's).
        """
        saved = self.read_meta() if saved is None else saved
        if saved is None:
            return
        saved, wanted = _normalise(saved), _normalise(meta)
        diffs = []
        # A section missing from the saved metadata was added to the code after the
        # checkpoint was written; its default (e.g. no experts) is what the old code did.
        for section in sorted(set(saved) - set(PROGRESS_KEYS)):
            a, b = saved.get(section), wanted.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                for key in sorted(set(a) | set(b)):
                    if a.get(key) != b.get(key):
                        diffs.append(f"{section}.{key}: checkpoint has {a.get(key)!r}, config has {b.get(key)!r}")
            elif a != b:
                diffs.append(f"{section}: checkpoint has {a!r}, config has {b!r}")
        if diffs:
            raise CheckpointMismatchError(
                f"The workdir {str(self.directory.parent)!r} holds a checkpoint (step {self.latest_step()}) of "
                "another model:\n  " + "\n  ".join(diffs) + "\nThe checkpoint was left untouched. Use a new "
                "--workdir, or the config that wrote it."
            )

    def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_normalise(meta))),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores onto the shardings of `abstract_state` (a tree of ShapeDtypeStructs).

        Fields with no arrays (e.g. `extra_emas=()` when no extra EMA is kept) are left out
        of the request and filled back in, so checkpoints written before such a field
        existed still restore.
        """
        step = self.latest_step() if step is None else step
        fields = dataclasses.fields(abstract_state) if dataclasses.is_dataclass(abstract_state) else ()
        empty = {f.name: getattr(abstract_state, f.name) for f in fields
                 if not jax.tree.leaves(getattr(abstract_state, f.name))}
        try:
            args = ocp.args.StandardRestore(abstract_state)
            return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except ValueError as e:  # written before an (empty) field existed: restore without it
            if not empty or "tree structures do not match" not in str(e):
                raise
        wanted = {f.name: getattr(abstract_state, f.name) for f in fields if f.name not in empty}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(wanted)))["state"]
        return dataclasses.replace(abstract_state, **restored, **empty)

    def restore_fields(self, step: int, fields: Mapping[str, Any]) -> dict:
        """Restores only the named top-level fields of the saved state, e.g.
        {"ema_params": abstract}: sampling needs one EMA, not the optimizer state. Leaves
        given as `skipped_like(...)` inside a field are not read either."""
        fields = dict(fields)
        restore_args = ocp.checkpoint_utils.construct_restore_args(fields)
        args = ocp.args.PyTreeRestore(fields, restore_args=restore_args, partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    def _read_error(self, step: int, error: Exception) -> str:
        """The damage reason of a failed read, or raises: other failures are not damage."""
        reason = damage_reason(error)
        if reason is None:
            root = _cause_chain(error)[-1]
            first_line = (str(root).splitlines() or [""])[0][:300]
            raise CheckpointReadError(
                f"Reading checkpoint step {step} in {self.directory} failed with {type(root).__name__}: {first_line}. "
                "This is not damage to the checkpoint, which was left as it is; fix the cause (memory, storage "
                "access, code version) and rerun."
            ) from error
        return reason

    def restore_latest_good(self, abstract_for: Callable[[dict], Any], restore: Callable[[int, Any], Any] | None = None,
                            quarantine: bool = False) -> tuple[int, Any, dict]:
        """Restores the newest checkpoint that reads back; returns (step, state, meta).

        `abstract_for(meta)` gives what to restore onto; its errors (a config that does not
        fit) are passed on. `restore(step, abstract)` restores it (default: the whole state).
        Only a checkpoint shown to be damaged (`damage_reason`) is skipped for the previous
        one, with a warning; any other read error is raised as CheckpointReadError naming
        the step. With `quarantine` (training only) a damaged checkpoint is moved aside to
        `checkpoints/unreadable_<step>` -- kept, never deleted -- so that training can write
        that step again; read-only callers leave it where it is.
        """
        restore = restore or (lambda step, abstract: self.restore(abstract, step))
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
            except Exception as e:
                failed.append((step, self._read_error(step, e)))
                continue
            abstract = abstract_for(meta)
            try:
                state = restore(step, abstract)
            except Exception as e:
                failed.append((step, self._read_error(step, e)))
                continue
            for bad_step, reason in failed:
                if quarantine and not self.read_only:
                    self._quarantine(bad_step, reason)
                else:
                    warnings.warn(f"Checkpoint step {bad_step} in {self.directory} is damaged ({reason}); using step "
                                  f"{step} instead. It was left in place; the next training run sets it aside.")
            return step, state, meta
        # Nothing readable: more likely a code/format mismatch than damage; touch nothing.
        raise RuntimeError(f"No checkpoint in {self.directory} could be read back (left as they are); the newest "
                           f"one is damaged: {failed[0][1] if failed else 'no checkpoints'}")

    def _quarantine(self, step: int, reason: str) -> None:
        source = self.directory / str(step)
        target = self.directory / f"unreadable_{step}"
        warnings.warn(f"Checkpoint step {step} in {self.directory} could not be read ({reason}); moved it to "
                      f"{target} and trying the previous checkpoint.")
        if source.exists():
            source.rename(target)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def kept_steps(workdir: str | os.PathLike) -> list[int]:
    """The checkpoint steps a workdir holds, ascending ([] when it has none).

    Reads only: a workdir without a `checkpoints` folder is not given one (Checkpointer
    would create it), and the manager is closed again before returning.
    """
    if not (as_path(workdir) / "checkpoints").is_dir():
        return []
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def skipped_like(tree: Any) -> Any:
    """A template of `tree` whose leaves `restore_fields` leaves unread."""
    return jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)


class _quiet_orbax_read_only:
    """Orbax warns on every read-only manager that the directory is read only; that is
    the point of opening it so, not news to the user."""

    def __enter__(self) -> None:
        import logging

        self._filter = lambda record: "read only" not in record.getMessage() and "read_only" not in record.getMessage()
        logging.getLogger("absl").addFilter(self._filter)

    def __exit__(self, *exc: Any) -> None:
        import logging

        logging.getLogger("absl").removeFilter(self._filter)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
