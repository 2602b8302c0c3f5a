"""Compile the trainer's own train step for a TPU topology, from abstract inputs, and read off
what a pod run would need: per-chip HBM, FLOPs per image, throughput ceilings, collective traffic.

Nothing runs and no weights are read: the experiment is built on the topology's (compile-only)
devices with shape-only text encoders, the train state is `training.state_shardings`' abstract
state with its shardings, and `training.compile_train_step` (the loop's step: its shardings and
donation) is lowered and compiled by the real XLA TPU compiler. An expert ensemble is planned
in its last (largest) phase; `experts.train_map="auto"` resolves as it would on TPU (vmap).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ediff_jax import parallel, sharding
from ediff_jax.checkpoints import abstract_with_shardings
from ediff_jax.plan import hlo
from ediff_jax.plan.chips import Chip, chip_for
from ediff_jax.plan.encoders import abstract_text_encoders
from ediff_jax.training import build_experiment, compile_train_step, state_shardings

MFU_SCENARIOS = (1.0, 0.4)


class DoesNotFit(Exception):
    """The TPU compiler refused the program for lack of HBM (its message says by how much)."""


def topology_devices(name: str) -> list:
    """The compile-only devices of a TPU topology name ("v5e:2x2")."""
    from jax.experimental import topologies

    chip_for(name)  # a bad name fails with the list of generations, before libtpu is asked
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as err:  # libtpu missing, or a shape this generation does not have
        raise ValueError(f"Cannot build TPU topology {name!r}: {str(err).splitlines()[0]}. Install the TPU compiler "
                         "with `pip install -e .[tpu]`, and give a shape the generation has (e.g. v5e:2x2, "
                         "v5e:16x16, v5p:2x2x1, v6e:2x2).") from None


def abstract_batch(exp: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """One global training batch as the loop feeds it: images (and the SR input), and text as tokens or,
    with `data.text_cache`, as cached embeddings."""
    config = exp.config
    b = int(config.train.batch_size)
    batch = {"image": jax.ShapeDtypeStruct((b, *exp.train_shape), jnp.float32)}
    if config.data.text_cache:
        batch.update(jax.eval_shape(exp.encoders.encode, exp.encoders.params, exp.encoders.tokenize([""] * b)))
    else:
        batch.update({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in exp.encoders.tokenize([""] * b).items()})
    if exp.is_sr:
        from ediff_jax import sr

        low = sr.lowres_train_size(config)
        batch["lowres"] = jax.ShapeDtypeStruct((b, low, low, 3), jnp.float32)
    spec = parallel.batch_sharding(exp.mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec) for k, v in batch.items()}


def _bytes_per_chip(tree: Any) -> int:
    return sharding.sharded_bytes_per_device(tree, jax.tree.map(lambda s: s.sharding, tree))


def plan_train_step(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
    """Compiles the train step of `config` for `topology`; returns the plan (JSON-ready)."""
    chip = chip_for(topology)
    devices = topology_devices(topology)
    config = config.copy_and_resolve_references()
    if config.experts.train_map == "auto":
        config.experts.train_map = "vmap"  # what "auto" picks on TPU
    hosts = len({d.process_index for d in devices})
    exp = build_experiment(config, devices=devices, encoders=abstract_text_encoders(config.text), process_count=hosts)
    phase = max(len(exp.phases) - 1, 0)
    abstract, shardings = state_shardings(exp, phase)
    state = abstract_with_shardings(abstract, shardings)
    enc_shardings = sharding.encoder_shardings(exp.encoders.params, exp.mesh, int(config.sharding.fsdp_min_size))
    enc = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), exp.encoders.params,
                       enc_shardings)
    batch = abstract_batch(exp)
    lowered = compile_train_step(exp, shardings, phase).lower(state, enc, batch)
    try:
        compiled = lowered.compile()
    except Exception as err:  # XLA reports an oversized program at compile time
        if "RESOURCE_EXHAUSTED" in str(err) or "exceeds" in str(err):
            raise DoesNotFit(str(err).splitlines()[0]) from None
        raise
    return report(exp, chip, topology, devices, state, enc, batch, compiled)


def report(exp: Any, chip: Chip, topology: str, devices: list, state: Any, enc: Any, batch: Any,
           compiled: Any) -> dict[str, Any]:
    """The plan of one compiled step: memory, compute and communication (see the module docstring)."""
    config = exp.config
    n = len(devices)
    b = int(config.train.batch_size)
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    parts = {
        "params": _bytes_per_chip(state.params),
        "optimizer": _bytes_per_chip(state.opt_state),
        "emas": _bytes_per_chip((state.ema_params, state.extra_emas, state.power_emas)),
        "batch": _bytes_per_chip(batch),
        "text_encoders": 0 if config.data.text_cache else _bytes_per_chip(enc),
        "temp (activations, gradients, workspace)": int(mem.temp_size_in_bytes),
    }
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_chip = float(cost.get("flops", -1))
    flops_per_image = flops_per_chip * n / b if flops_per_chip > 0 else None
    comm = hlo.collectives(compiled.as_text(), n)
    wire = sum(v["wire_bytes"] for v in comm.values())
    compute_s = {f"{int(m * 100)}%": flops_per_chip / (chip.peak_flops * m) for m in MFU_SCENARIOS} \
        if flops_per_image else {}
    comm_s = wire / chip.ici_bytes_per_s if chip.ici_bytes_per_s else None
    return {
        "topology": topology, "chip": chip.device_kind, "chips": n, "hosts": len({d.process_index for d in devices}),
        "mesh": dict(exp.mesh.shape), "global_batch": b, "per_chip_batch": b / n,
        "experts": exp.num_experts(max(len(exp.phases) - 1, 0)) or 1, "train_map": str(config.experts.train_map),
        "text": "cached embeddings" if config.data.text_cache else "tokens (encoders run in the step)",
        "memory": {
            "hbm_bytes": chip.hbm_bytes, "compiled_total_bytes": int(total),
            "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
            "parts_per_chip": parts, "fits": total <= chip.hbm_bytes, "headroom_bytes": int(chip.hbm_bytes - total),
        },
        "compute": {
            "flops_per_chip_per_step": flops_per_chip, "flops_per_image": flops_per_image,
            "peak_flops_per_chip": chip.peak_flops,
            "images_per_s_per_chip": {f"{int(m * 100)}%": chip.peak_flops * m / flops_per_image
                                      for m in MFU_SCENARIOS} if flops_per_image else {},
            "images_per_s_pod": {f"{int(m * 100)}%": n * chip.peak_flops * m / flops_per_image
                                 for m in MFU_SCENARIOS} if flops_per_image else {},
            "step_seconds": compute_s,
        },
        "communication": {
            "per_kind": comm, "wire_bytes_per_chip": wire, "ici_bytes_per_s": chip.ici_bytes_per_s,
            "seconds": comm_s,
            "compute_bound_at_40%": (comm_s < compute_s["40%"]) if comm_s is not None and compute_s else None,
        },
    }


def gib(x: float) -> str:
    """Bytes for reading: GiB, or MiB / KiB below them."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a short, readable text block."""
    m, c, k = plan["memory"], plan["compute"], plan["communication"]
    hosts = f"{plan['hosts']} host" + ("s" if plan["hosts"] != 1 else "")
    lines = [f"{plan['topology']}: {plan['chips']} x {plan['chip']} ({hosts}), mesh {plan['mesh']}, "
             f"global batch {plan['global_batch']} ({plan['per_chip_batch']:g} per chip), {plan['experts']} expert(s) "
             f"({plan['train_map']}), text: {plan['text']}",
             f"Memory per chip: {gib(m['compiled_total_bytes'])} of {gib(m['hbm_bytes'])} HBM -> "
             + ("fits" if m["fits"] else "DOES NOT FIT") + f", headroom {gib(m['headroom_bytes'])}"]
    lines += [f"  {name}: {gib(v)}" for name, v in m["parts_per_chip"].items()]
    if c["flops_per_image"]:
        lines.append(f"Compute: {c['flops_per_image'] / 1e12:.3f} TFLOP per image; peak {c['peak_flops_per_chip'] / 1e12:g} "
                     "TFLOP/s per chip; images/s per chip " + ", ".join(
                         f"{v:.3g} at {mfu} MFU" for mfu, v in c["images_per_s_per_chip"].items())
                     + "; per pod " + ", ".join(f"{v:.4g} at {mfu}" for mfu, v in c["images_per_s_pod"].items()))
    kinds = ", ".join(f"{kind} {v['count']}x {gib(v['wire_bytes'])}" for kind, v in k["per_kind"].items() if v["count"])
    comm_time = f"{k['seconds'] * 1e3:.2f} ms at ICI" if k["seconds"] is not None else "ICI bandwidth unpublished"
    bound = {True: "compute-bound", False: "communication-bound", None: "bound unknown"}[k["compute_bound_at_40%"]]
    step40 = c["step_seconds"].get("40%")
    lines.append(f"Communication per chip per step: {kinds or 'none'}; {comm_time}"
                 + (f" vs {step40 * 1e3:.2f} ms compute at 40% MFU -> {bound}" if step40 else ""))
    return "\n".join(lines)

