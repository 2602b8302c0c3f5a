"""The train loop: restore or init, data -> step -> logs, checkpoints and sample grids,
preemption and time boxes, and the final grid.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from ediff_jax import flops, logs, parallel, resume_policy, sr
from ediff_jax.checkpoints import Checkpointer
from ediff_jax.images import ensure_writable_dir, make_grid, save_png, to_uint8
from ediff_jax.metrics import MetricWriter
from ediff_jax.posthoc_snapshots import SnapshotWriter
from ediff_jax.sampling import Sampler
from ediff_jax.text.cache import load_or_build_cache
from ediff_jax.training.experiment import (
    Experiment,
    TrainState,
    branch_state,
    build_experiment,
    check_config_against,
    init_train_state,
    model_meta,
    progress_meta,
    restore_checkpoint,
)
from ediff_jax.training.step import compile_train_step, sigma_bucket_names
from ediff_jax.training.warm_start import warm_start
from ediff_jax.workdir_lock import WorkdirLock, WorkdirLockedError


def restore_or_init(exp: Experiment, ckpt: Checkpointer) -> tuple[TrainState, Any, int, dict]:
    """Resumes from the newest readable checkpoint if there is one (after checking it fits).

    Returns the state, its shardings, its expert phase and what changed since the
    checkpoint's run (`resume_policy.compare`). A config that does not fit the checkpoint,
    or changes a setting that resuming depends on, is refused before anything is written;
    an unreadable latest checkpoint is set aside and the previous one used, with a warning.
    """
    if ckpt.latest_step() is None:
        if exp.config.experts.init_from:  # a branched run's first start: from the shared model's workdir
            return warm_start(exp, ckpt.directory.parent)
        return (*init_train_state(exp), 0, {})
    found: dict[str, Any] = {}

    def check_resume(saved: dict) -> None:
        found["changes"] = check_config_against(exp, saved, ckpt.directory.parent)

    restored = restore_checkpoint(exp, ckpt, check=check_resume, quarantine=True)
    step, state = restored.step, restored.tree
    changes = found.get("changes", {})
    for change in changes.get("warned", []):
        logs.warning(f"Resuming with a changed setting: {change}")
    for key, (a, b) in changes.get("accepted", {}).items():
        logs.warning(f"Resuming with {key} changed from {a!r} to {b!r}, as config.train.allow_resume_change asks.")
    logs.info(f"Resuming from {ckpt.directory} at step {step}")
    return state, restored.shardings, restored.phase, changes


class PreemptionGuard:
    """SIGTERM (a preempted TPU/GPU job) sets a flag; the loop then saves and stops cleanly.

    With several processes the flag is agreed on (any process's signal stops all), so
    every host saves the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def should_stop(self, lost_workdir: bool = False) -> tuple[bool, bool]:
        """(stop and save, stop without saving): SIGTERM on any process, or process 0 having
        lost the workdir lock to another run (which then owns the checkpoints)."""
        if jax.process_count() == 1:
            return self.requested, lost_workdir
        from jax.experimental import multihost_utils

        agreed = np.max(multihost_utils.process_allgather(np.array([self.requested, lost_workdir], np.int32)), axis=0)
        return bool(agreed[0]), bool(agreed[1])

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def summarize(history: list[dict], first_step: int, skip_nonfinite: bool) -> dict[str, float]:
    """Means over the logged steps, per-sigma-bucket losses, and the NaN/Inf check.

    Raises FloatingPointError naming the first step whose loss or gradients were not
    finite, unless those updates were skipped (then they are counted).
    """
    host = [jax.device_get(m) for m in history]
    bad = [first_step + i for i, m in enumerate(host) if int(m["nonfinite"])]
    if bad and not skip_nonfinite:
        raise FloatingPointError(
            f"Loss or gradients became NaN/Inf at step {bad[0]} (loss {float(host[bad[0] - first_step]['loss'])}, "
            f"grad norm {float(host[bad[0] - first_step]['grad_norm'])}). Lower config.train.lr, check the data, "
            "or set config.train.skip_nonfinite=True to skip such updates; the last good checkpoint is untouched."
        )
    good = [m for m in host if not int(m["nonfinite"])] or host
    scalars = {k: float(np.mean([m[k] for m in good])) for k in host[0] if np.ndim(host[0][k]) == 0
               and k != "nonfinite"}
    sums, counts = np.sum([m["bucket_loss_sum"] for m in good], 0), np.sum([m["bucket_count"] for m in good], 0)
    for name, total, count in zip(sigma_bucket_names(), sums, counts):
        if count:
            scalars[name] = float(total / count)
    scalars["skipped_nonfinite"] = float(sum(int(m["nonfinite"]) for m in host))  # skipped model/expert updates
    return scalars


def _flops_and_peak(exp: Experiment, train_step: Callable, args: tuple) -> tuple[float | None, float | None]:
    """Global FLOPs of one step (XLA's cost analysis of the lowered program, nothing compiled)
    and the per-device peak: published for TPU/GPU, a measured matmul rate on CPU."""
    try:
        step_flops = flops.flops_from_cost_analysis(train_step.lower(*args).cost_analysis())
    except Exception as e:  # cost analysis is best effort across backends
        logs.info(f"No FLOP count for MFU ({e}).")
        return None, None
    device = jax.devices()[0]
    peak = flops.device_peak_flops(device)
    if peak is None and device.platform == "cpu":
        peak = flops.measure_matmul_peak(size=1024, repeats=3)
        logs.info(f"CPU matmul peak (measured, float32): {peak / 1e9:.1f} GFLOP/s per device")
    return step_flops, peak


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, stop_after: int | None = None) -> TrainState:
    """The train loop: data -> step -> logs, checkpoints and sample grids -> final grid.

    `stop_after` ends this run early at that step, with a checkpoint (as a preempted job
    would); rerunning resumes exactly where it stopped. SIGTERM does the same at the
    step in flight, and so does `config.train.max_minutes` once that much wall time has
    passed (time-boxed runs, e.g. the 60-minute shapes benchmark). Only process 0 writes
    logs, metrics, config and sample grids, and only while it holds the workdir's lock
    (`ediff_jax.workdir_lock`): a second trainer on a live workdir is refused.
    """
    started = time.perf_counter()
    max_seconds = 60.0 * float(config.train.get("max_minutes", 0.0) or 0.0)
    if max_seconds < 0:
        raise ValueError(f"config.train.max_minutes={config.train.max_minutes} is negative; use 0 for no time budget.")
    workdir = ensure_writable_dir(workdir)
    lock = _lock_workdir(config, workdir)
    try:
        return _train(config, workdir, stop_after, started, max_seconds, lock)
    finally:
        lock.release()


def _lock_workdir(config: ml_collections.ConfigDict, workdir: epath.Path) -> WorkdirLock:
    """Process 0 locks the workdir (one writer per workdir); every process learns whether it
    got it, so that a refused multi-host job stops everywhere instead of hanging."""
    lock = WorkdirLock(workdir, take_over=bool(config.train.take_over_workdir), process_index=jax.process_index())
    if jax.process_count() == 1:
        return lock.acquire()
    from jax.experimental import multihost_utils

    try:
        lock.acquire()
        refused = None
    except WorkdirLockedError as e:
        refused = e
    if np.max(multihost_utils.process_allgather(np.int32(refused is not None))):
        lock.release()
        raise refused or WorkdirLockedError(f"Process 0 could not lock {workdir}; its output says why.")
    return lock


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, stop_after: int | None, started: float,
           max_seconds: float, lock: WorkdirLock) -> TrainState:
    """`train_and_evaluate`'s body, run while this job holds the workdir lock."""
    from ediff_jax.data import (
        pipeline,  # deferred: importing TF is slow and notebooks may not need it
    )

    exp = build_experiment(config)
    builder = pipeline.builder_from_config(config.data)
    ckpt = Checkpointer(workdir, keep=int(config.train.keep_ckpts))
    state, shardings, phase, changes = restore_or_init(exp, ckpt)
    snapshots = SnapshotWriter(workdir, config.train.posthoc_ema.gammas, int(config.train.posthoc_ema.every),
                               start_step=int(state.step))
    main_process = jax.process_index() == 0
    if main_process:
        resume_policy.write_history(workdir, config.to_json_best_effort(indent=2), {
            "start_step": int(state.step), "process_count": jax.process_count(),
            "accepted_changes": changes.get("accepted", {}), "warned_changes": changes.get("warned", [])})

    pipeline.prepare(builder)
    text_cache = load_or_build_cache(builder, exp.encoders, config.text) if config.data.text_cache else None
    start = int(state.step)
    data = train_iterator(config, builder, start)
    train_step = compile_train_step(exp, shardings, phase)
    writer = MetricWriter(workdir) if main_process else None
    meta = model_meta(config)
    num_steps = int(config.train.num_steps)
    last = num_steps if stop_after is None else min(num_steps, int(stop_after))
    log_every = int(config.train.log_every)
    skip_nonfinite = bool(config.train.skip_nonfinite)
    profile = tuple(int(s) for s in config.train.profile_steps)
    step_flops = peak = None

    bar = tqdm(total=num_steps, initial=start, desc="train", disable=not main_process, dynamic_ncols=True)
    history: list[dict] = []
    t_last, step = time.perf_counter(), start
    with PreemptionGuard() as preemption:
        for step in range(start + 1, last + 1):
            if exp.phase_at(step) != phase:  # expert branching: children start as copies of their parents
                phase = exp.phase_at(step)
                state, shardings = branch_state(exp, state, phase)
                train_step = compile_train_step(exp, shardings, phase)
                step_flops = None
                logs.info(f"Step {step}: expert phase {phase}, {exp.num_experts(phase)} experts on "
                          f"quantile intervals {exp.phases[phase]}")
            batch = next(data)
            captions = list(batch["caption"])
            text = text_cache.lookup(captions) if text_cache else exp.encoders.tokenize(captions)
            arrays = {"image": batch["image"], **text}
            if exp.is_sr:
                arrays["lowres"] = batch["lowres"]
            arrays = parallel.shard_batch(arrays, exp.mesh)
            if config.train.log_mfu and step_flops is None:
                step_flops, peak = _flops_and_peak(exp, train_step, (state, exp.encoders.params, arrays))
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(workdir / "profile"))
            state, metrics = train_step(state, exp.encoders.params, arrays)
            if profile and step == profile[-1]:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                logs.info(f"Profile of steps {profile[0]}-{profile[-1]} written to {workdir / 'profile'}")
            history.append(metrics)
            bar.update(1)
            out_of_time = bool(max_seconds) and step < last and time.perf_counter() - started >= max_seconds
            preempted, lost = preemption.should_stop(lock.lost)
            if lost:  # another run took the workdir over: it owns the checkpoints now
                logs.warning(f"Step {step}: another run took over {workdir} ({lock.lost_reason}); stopping without "
                             "writing anything more.")
                last = -1
                break
            stop = preempted or out_of_time
            snapshots.maybe_save(step, state, exp.phases[phase] if exp.phases else None)
            if step % log_every == 0 or step == last or stop:
                try:
                    scalars = summarize(history, step - len(history) + 1, skip_nonfinite)
                except FloatingPointError:
                    ckpt.close()
                    snapshots.close()
                    raise
                elapsed = time.perf_counter() - t_last
                scalars["steps_per_sec"] = len(history) / elapsed
                scalars["images_per_sec"] = len(history) * config.train.batch_size / elapsed
                if step_flops and peak:
                    scalars["mfu"] = step_flops * scalars["steps_per_sec"] / (peak * jax.device_count())
                if writer:
                    writer.write(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", sps=f"{scalars['steps_per_sec']:.2f}")
                history, t_last = [], time.perf_counter()
            phase_end = step in exp.phase_ends  # always checkpointed: runs resume across phase boundaries
            if step % int(config.train.ckpt_every) == 0 or step == last or phase_end or stop:
                ckpt.save(step, state, {**meta, "progress": progress_meta(exp, phase)},
                          force=step == last or phase_end or stop)
            if stop:
                why = f"time budget of {config.train.max_minutes:g} min spent" if out_of_time else "SIGTERM"
                logs.info(f"{why}: saved step {step} to {ckpt.directory}; rerun the same command to resume.")
                if float(config.train.lr_decay_fraction) > 0:  # a decay cut short is not the run that was asked for
                    rate = float(exp.schedule(step)) / float(config.train.lr)
                    logs.warning(f"config.train.lr_decay_fraction: stopped at step {step} of {num_steps}, with the "
                                 f"rate still at {rate:.0%} of lr; resume to finish the decay.")
                last = step
                break
            if config.train.sample_every and step % int(config.train.sample_every) == 0 and step != num_steps:
                _write_grid(exp, state, phase, workdir / "samples" / f"step_{step:07d}.png", writer, step)
    bar.close()
    ckpt.wait()
    snapshots.close()
    if last == num_steps and (num_steps > start or not (workdir / "samples" / "final.png").exists()):
        _write_grid(exp, state, phase, workdir / "samples" / "final.png", writer, num_steps)
    ckpt.close()
    return state


def train_iterator(config: ml_collections.ConfigDict, builder: Any, start_step: int, split: str = "train") -> Any:
    """This process's training batches from `start_step` on (its share of each global batch)."""
    from ediff_jax.data import pipeline  # deferred: importing TF is slow

    process_count = jax.process_count()
    return pipeline.make_train_iterator(
        builder,
        batch_size=config.train.batch_size // process_count,
        seed=int(config.seed),
        image_size=int(config.data.image_size) if config.data.resize else None,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=process_count,
        shuffle_buffer=int(config.data.shuffle_buffer),
        cache_decoded=bool(config.data.cache_decoded),
        relation_repeats=int(config.data.relation_repeats) if split == "train" else 1,
        split=split,
        **_sr_data_args(config),
    )


def _sr_data_args(config: ml_collections.ConfigDict) -> dict:
    """Input-pipeline arguments of an SR stage: crops, the low-res size, degradations."""
    if not sr.is_sr(config):
        return {}
    return {"crop_size": int(config.sr.crop_size) or None, "lowres_size": sr.lowres_train_size(config),
            "degradation": sr.degradation_config(config)}


def _sr_grid_inputs(exp: Experiment, count: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Captions, clean low-res inputs and originals of the first `count` validation images."""
    from ediff_jax.data import pipeline  # deferred: importing TF is slow

    config = exp.config
    builder = pipeline.builder_from_config(config.data)
    size = int(config.data.image_size)
    batch = next(pipeline.make_eval_iterator(builder, batch_size=count, center_crop=size,
                                             image_size=size if config.data.resize else None,
                                             lowres_size=int(config.sr.lowres_size)))
    return [str(c) for c in batch["caption"]], batch["lowres"], batch["image"]


def _write_grid(exp: Experiment, state: TrainState, phase: int, path: epath.Path, writer: MetricWriter, step: int) -> None:
    """Samples with the EMA weights (the whole ensemble).

    A base model: `config.sample.prompts`, a row per prompt. An SR stage: validation
    images, a row each of [low-res input (upsampled) | samples | original].
    """
    config = exp.config
    if jax.process_index() != 0 or not config.sample.prompts:  # no prompts: no grids
        return
    boundaries = progress_meta(exp, phase).get("boundaries")
    sampler = Sampler(exp.model, exp.encoders, image_size=int(config.data.image_size), steps=int(config.sample.steps),
                      sampler=config.sample.sampler, sigma_data=float(config.edm.sigma_data), boundaries=boundaries,
                      lowres_factor=sr.scale_factor(config))
    num = int(config.sample.num_per_prompt)
    if exp.is_sr:
        prompts, lowres, originals = _sr_grid_inputs(exp, len(config.sample.prompts))
        images = sampler(state.ema_params, [p for p in prompts for _ in range(num)],
                         guidance=float(config.sample.guidance), seed=int(config.seed),
                         lowres=np.repeat(lowres, num, axis=0), aug_level=float(config.sr.aug_level))
        size = images.shape[1]
        up = to_uint8(jax.image.resize(jnp.asarray(lowres), (len(prompts), size, size, 3), "nearest"))
        rows = np.concatenate([up[:, None], images.reshape(len(prompts), num, *images.shape[1:]),
                               to_uint8(originals)[:, None]], axis=1)
        images, num = rows.reshape(-1, *rows.shape[2:]), num + 2
    else:
        prompts = list(config.sample.prompts)
        images = sampler(state.ema_params, [p for p in prompts for _ in range(num)],
                         guidance=float(config.sample.guidance), seed=int(config.seed))
    grid = make_grid(images, cols=num)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path, upscale=max(1, 128 // images.shape[1]))
    (path.parent / (path.stem + "_prompts.txt")).write_text("\n".join(prompts) + "\n")
    writer.write_image(step, "samples", grid)
    logs.info(f"Wrote sample grid {path}")
