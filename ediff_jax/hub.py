"""Checkpoint arguments that may be local directories or Hugging Face hub ids (``org/name[@revision]``).

One resolver for every loader (text encoders, CLIP score), so that a config value means the same
thing everywhere: an existing local directory wins, a string shaped like ``org/name`` is a hub id
fetched through ``huggingface_hub``'s cache (honouring HF_HUB_OFFLINE, HF_HUB_CACHE and HF_HOME),
anything else is a missing path. The revision lives in the string so that it travels with
``config.text.t5_path`` into everything keyed by that value (e.g. the text-embedding cache).
"""

from __future__ import annotations

import os
import pathlib
import re

# What our loaders read: configs, safetensors weights, tokenizers (spiece.model, vocab.json,
# merges.txt). Hub repos often also hold pickled / TF / Flax copies of the weights, which we
# never read and should not download.
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt")
_HUB_PART = r"\w(?:[\w.-]*\w)?"  # huggingface_hub's validate_repo_id, one "/" required
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}", re.ASCII)


class CheckpointError(ValueError):
    """A checkpoint directory, hub id or load argument is unusable; the message says how to fix it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Neither a local directory nor a hub snapshot could be found; also a FileNotFoundError."""


def is_hub_id(text: str) -> bool:
    """``org/name`` or ``org/name@revision`` (the shape, not whether the repo exists)."""
    repo_id = text.split("@", 1)[0]
    return bool(_HUB_ID.fullmatch(repo_id)) and "--" not in repo_id and ".." not in repo_id


def resolve_checkpoint_dir(path_or_id: str | os.PathLike[str], revision: str | None = None) -> pathlib.Path:
    """Local directory, or the cached (downloaded if allowed) snapshot of hub id ``org/name[@revision]``.

    ``revision`` (branch, tag or commit) is the same as writing ``@revision``; both may be given only
    if they agree. Raises CheckpointNotFoundError with a one-line message saying what was searched.
    """
    text = os.fspath(path_or_id)
    local = pathlib.Path(text).expanduser()
    repo_id, _, pinned = text.partition("@")
    if local.is_dir():
        if revision is not None:
            raise CheckpointError(
                f"revision {revision!r} given for local directory {str(local)!r}; revisions apply to hub ids only"
            )
        return local
    if not is_hub_id(text):
        raise CheckpointNotFoundError(
            f"checkpoint directory {str(local)!r} does not exist (or is not a directory). Pass a local "
            "Hugging Face model directory (config.json + model.safetensors) or a hub id 'org/name[@revision]'."
        )
    if pathlib.Path(repo_id).expanduser().is_dir():
        raise CheckpointError(
            f"{text!r} pins a revision, but {repo_id!r} is a local directory; revisions apply to hub ids only"
        )
    if "@" in text and not pinned:
        raise CheckpointError(f"empty revision in {text!r}; write 'org/name@REVISION' (a branch, tag or commit)")
    if revision is not None and pinned and revision != pinned:
        raise CheckpointError(f"{text!r} pins revision {pinned!r} but revision={revision!r} was also given")
    return _snapshot(repo_id, pinned or revision or "main")


def _snapshot(repo_id: str, revision: str) -> pathlib.Path:
    from huggingface_hub import constants, snapshot_download  # heavy import, only for hub ids
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = constants.HF_HUB_CACHE  # read at call time: the attribute may be patched (tests)
    includes = " ".join(f"--include '{p}'" for p in HUB_FILE_PATTERNS)
    get = f"`hf download {repo_id} --revision {revision} {includes}`"
    missing = f"is not in the Hugging Face cache {cache!r}"
    try:
        return pathlib.Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILE_PATTERNS))
        )
    except RevisionNotFoundError as err:
        problem = f"does not exist on the Hub ({_first_line(err)}); pin an existing branch, tag or commit"
    except (RepositoryNotFoundError, GatedRepoError) as err:
        problem = (
            f"{missing}, and the Hub says the repo does not exist or is private or gated "
            f"({_first_line(err)}); check the id, or accept its terms on huggingface.co and run `hf auth login`"
        )
    except (HfHubHTTPError, OSError) as err:  # LocalEntryNotFoundError (offline / no network) is an OSError
        if constants.HF_HUB_OFFLINE:
            fix = f"run once with network access, or {get}, or unset HF_HUB_OFFLINE"
            problem = f"{missing} and HF_HUB_OFFLINE is set; {fix}"
        else:
            fix = f"run once with network access, or {get}"
            problem = f"{missing} and could not be downloaded ({_first_line(err)}); {fix}"
    raise CheckpointNotFoundError(
        f"hub model {repo_id!r} at revision {revision!r} (not a local directory either) {problem}"
    ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
