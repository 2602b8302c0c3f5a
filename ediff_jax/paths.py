"""One path type for every file the project reads or writes: local paths and object stores.

`as_path` turns a user's string into an `etils.epath.Path`, the path type orbax and TFDS
already use, so `gs://bucket/run` stays a URI all the way down (a `pathlib.Path` would
collapse it into a local folder `gs:/bucket/run`). Local paths are expanded (`~`) and made
absolute, so a run started from another folder names the same files.
"""

from __future__ import annotations

import os

from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")


def is_remote(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local path (expanded and absolute) or an object-store URI, as `epath.Path`."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
