"""What a resumed run may change, and the record of what each run of a workdir used.

Every config key is in one of three classes (`RESUME_RULES`, first matching prefix wins):

- `must_match`: the checkpoint or the exact data resume depends on it (model shape, the
  data stream's batch size and process count, the training p(sigma) that fixes the
  experts' boundaries, the text encoders). A change is refused, naming the key, before
  anything is written, unless it is listed in `config.train.allow_resume_change`.
- `warn`: a legitimate mid-run change that alters the optimisation (learning rate, EMA
  decay, logging and checkpoint cadence). Accepted, with a warning.
- `free`: cannot matter to the checkpoint or the data (rematerialisation, compute dtype,
  mesh and sharding, profiling, sampling grids).

The old config comes from the checkpoint's own metadata, so it survives a later run
overwriting `config.json`; `config_history/` keeps one dated file per run.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Mapping

MUST_MATCH, WARN, FREE = "must_match", "warn", "free"

# (dotted key prefix, class); the first prefix that matches a key decides. Keep the
# more specific prefixes first. A key of base_config() that matches none is a bug
# (tests/test_trustworthy_runs.py::test_every_config_key_has_a_resume_rule checks every key).
RESUME_RULES: tuple[tuple[str, str], ...] = (
    ("seed", MUST_MATCH),
    ("process_count", MUST_MATCH),  # not a config key: recorded with each checkpoint
    ("data.cache_decoded", FREE),  # the same stream either way
    ("data.text_cache", WARN),  # cached embeddings equal the encoder's up to rounding
    ("data.data_dir", WARN),  # the same dataset may be prepared elsewhere
    ("data", MUST_MATCH),  # name, size, resize, shuffle buffer: the data stream
    ("text.drop_rates", WARN),
    ("text", MUST_MATCH),  # encoders and token lengths: the conditioning the model learnt
    ("model.remat", FREE),
    ("model.dtype", FREE),  # compute dtype; master weights stay float32
    ("model", MUST_MATCH),
    ("sr.aug_level", FREE),  # sampling only
    ("sr.aug_max", WARN),
    ("sr", MUST_MATCH),
    ("edm", MUST_MATCH),  # sigma_data, and p(sigma) whose quantiles are the experts' sigma boundaries
    ("experts.train_map", FREE),  # the same update, computed another way
    ("experts", MUST_MATCH),
    ("mesh", FREE),  # checkpoints restore onto any mesh
    ("sharding", FREE),
    ("train.batch_size", MUST_MATCH),  # exact data resume: step k starts at example k * batch
    ("train.extra_ema_decays", MUST_MATCH),  # the EMAs are part of the checkpoint
    ("train.posthoc_ema.gammas", MUST_MATCH),  # the power EMAs are part of the checkpoint
    ("train.posthoc_ema.every", WARN),  # snapshots before and after keep their own steps
    ("train.allow_resume_change", FREE),
    ("train.take_over_workdir", FREE),
    ("train.log_mfu", FREE),
    ("train.max_minutes", FREE),
    ("train.profile_steps", FREE),
    ("train", WARN),  # lr, warmup, weight decay, clipping, EMA decay, num_steps, cadences
    ("sample", FREE),  # grids only
)


def key_class(key: str) -> str:
    for prefix, cls in RESUME_RULES:
        if key == prefix or key.startswith(prefix + "."):
            return cls
    raise KeyError(f"Config key {key!r} has no resume rule; add one to ediff_jax/resume_policy.py:RESUME_RULES.")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, values JSON-normalised so tuples equal lists."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def allowed_changes(config: Any) -> list[str]:
    """`config.train.allow_resume_change` ('a.b,c.d' or a sequence) as a list of keys."""
    value = config.train.get("allow_resume_change", "") or ""
    keys = value.split(",") if isinstance(value, str) else list(value)
    return [k.strip() for k in keys if k.strip()]


def compare(old: Mapping[str, Any], new: Mapping[str, Any], allowed: list[str] = ()) -> dict[str, Any]:
    """Classifies the differences between two flattened configs.

    Returns {"refused": [...], "warned": [...], "accepted": {key: [old, new]}} with one
    message per key. `allowed` keys are accepted even when they must match.
    """
    refused, warned, accepted = [], [], {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b:
            continue
        cls = key_class(key)
        if cls == FREE:
            continue
        change = f"{key}: {a!r} -> {b!r}"
        if cls == WARN:
            warned.append(change)
        elif key in allowed:
            accepted[key] = [a, b]
        else:
            refused.append(change + _why(key))
    return {"refused": refused, "warned": warned, "accepted": accepted}


def _why(key: str) -> str:
    if key == "train.posthoc_ema.gammas":
        return (" (the checkpoint holds exactly the power EMAs it was trained with; they cannot be added or removed "
                "mid-run: their averages start at step 0. Start a new --workdir)")
    if key == "train.extra_ema_decays":
        return (" (the checkpoint holds exactly the EMAs it was trained with; an EMA cannot be added or removed "
                "mid-run. Sample with those it has, or start a new --workdir)")
    if key in ("train.batch_size", "process_count", "seed") or key.startswith("data."):
        return " (exact data resume depends on it)"
    if key.startswith("edm.") or key.startswith("experts."):
        return " (it moves the experts' sigma boundaries and the noise distribution trained so far)"
    return ""


def check_resume(old: Mapping[str, Any], new: Mapping[str, Any], allowed: list[str], workdir: str) -> dict:
    """Raises ValueError listing every refused change; returns `compare`'s result."""
    unknown = [k for k in allowed if k not in old and k not in new]
    if unknown:
        raise ValueError(f"config.train.allow_resume_change names {unknown}, which are not config keys "
                         "(write them dotted, e.g. edm.p_mean,train.batch_size).")
    result = compare(old, new, allowed)
    if result["refused"]:
        keys = ",".join(c.split(":")[0] for c in result["refused"])
        raise ResumeChangeError(
            f"The workdir {workdir!r} was trained with other settings that a resume depends on:\n  "
            + "\n  ".join(result["refused"])
            + "\nNothing was written. Use the original values (see the workdir's config_history/), a new --workdir, "
            f"or accept the change on purpose with --config.train.allow_resume_change={keys}"
        )
    return result


class ResumeChangeError(ValueError):
    """A resumed run changes a setting that the checkpoint or the data stream depends on."""


def write_history(workdir: Path, config_json: str, record: Mapping[str, Any]) -> Path:
    """Writes `config.json` (the latest) and `config_history/<UTC time>_step<N>.json` (this run)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    history = workdir / "config_history"
    history.mkdir(parents=True, exist_ok=True)
    path = history / f"{stamp}_step{int(record.get('start_step', 0))}.json"
    path.write_text(json.dumps({**record, "config": json.loads(config_json)}, indent=2, default=str))
    (workdir / "config.json").write_text(config_json)
    return path
