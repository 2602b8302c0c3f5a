"""Plan the text-embedding cache on a pod: compile T5 + CLIP encoding for a TPU topology.

eDiff-I trains on cached T5-XXL and CLIP-L/14 embeddings (`data.text_cache`): the encoders run
once per caption, in `ediff_jax.text.cache.encode_captions`, and never in the train step. That
function jits `TextEncoders.encode` with the parameters as an argument, wherever the experiment
placed them. This plan compiles the same `encode` for a topology two ways:

- `sharded`: parameters split as training loads them (`sharding.encoder_shardings`: FSDP over
  `mesh.fsdp`), captions split over the batch axes;
- `replicated`: every chip holding the whole encoders (a pure data-parallel mesh gives this too).

and reports per-chip HBM (fits or not), FLOPs per caption, captions/s at 40% MFU and the
collectives' traffic, as `compile.report` does for a train step. The global batch is
`config.train.batch_size` captions per call.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from ediff_jax import parallel, sharding
from ediff_jax.plan import hlo
from ediff_jax.plan.chips import chip_for
from ediff_jax.plan.compile import MFU_SCENARIOS, DoesNotFit, gib, topology_devices
from ediff_jax.plan.encoders import abstract_text_encoders

LAYOUTS = ("sharded", "replicated")


def plan_text_encoding(config: ml_collections.ConfigDict, topology: str, layout: str = "sharded") -> dict[str, Any]:
    """Compiles `TextEncoders.encode` of `config.text` for `topology`; returns the plan (JSON-ready).

    A program too big for the chip is returned as a plan with `memory.fits = False` and the
    compiler's message, not raised: not fitting is an answer here.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown encoder layout {layout!r}; choose one of {LAYOUTS}.")
    chip = chip_for(topology)
    devices = topology_devices(topology)
    mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
    captions = int(config.train.batch_size)
    dp = parallel.data_parallel_size(mesh)
    if captions % dp:
        raise ValueError(f"config.train.batch_size={captions} captions do not split over the {dp} data-parallel "
                         "chips of this mesh; pick a multiple.")
    encoders = abstract_text_encoders(config.text)
    if layout == "sharded":  # where training and the cache builder put them (`place_encoders`)
        param_shardings = sharding.encoder_shardings(encoders.params, mesh, int(config.sharding.fsdp_min_size))
    else:
        param_shardings = jax.tree.map(lambda _: parallel.replicated(mesh), encoders.params)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          encoders.params, param_shardings)
    batch_sharding = parallel.batch_sharding(mesh)
    tokens = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
              for k, v in encoders.tokenize([""] * captions).items()}
    lowered = jax.jit(encoders.encode, out_shardings=batch_sharding).lower(params, tokens)
    head = {"topology": topology, "chip": chip.device_kind, "chips": len(devices), "mesh": dict(mesh.shape),
            "layout": layout, "captions_per_call": captions, "captions_per_chip": captions / len(devices),
            "t5_tokens": int(encoders.t5_max_length), "clip_tokens": int(encoders.clip_max_length),
            "parameters": sum(x.size for x in jax.tree.leaves(encoders.params)),
            "params_per_chip_bytes": sharding.sharded_bytes_per_device(params, param_shardings)}
    try:
        compiled = lowered.compile()
    except Exception as err:  # XLA reports an oversized program at compile time
        if "RESOURCE_EXHAUSTED" in str(err) or "exceeds" in str(err):
            return {**head, "memory": {"fits": False, "hbm_bytes": chip.hbm_bytes},
                    "compiler": str(err).splitlines()[0]}
        raise
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_chip = float(cost.get("flops", -1))
    per_caption = flops_per_chip * len(devices) / captions if flops_per_chip > 0 else None
    comm = hlo.collectives(compiled.as_text(), len(devices))
    wire = sum(v["wire_bytes"] for v in comm.values())
    compute_s = {f"{int(m * 100)}%": flops_per_chip / (chip.peak_flops * m) for m in MFU_SCENARIOS} \
        if per_caption else {}
    comm_s = wire / chip.ici_bytes_per_s if chip.ici_bytes_per_s else None
    # What bounds a call: its compute at that MFU or its collectives at ICI, whichever is slower.
    per_s_pod = {k: captions / max(t, comm_s or 0.0) for k, t in compute_s.items()}
    return {**head, "memory": {
                "hbm_bytes": chip.hbm_bytes, "compiled_total_bytes": int(total), "fits": total <= chip.hbm_bytes,
                "headroom_bytes": int(chip.hbm_bytes - total), "argument_bytes": int(mem.argument_size_in_bytes),
                "output_bytes": int(mem.output_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)},
            "compute": {"flops_per_chip_per_call": flops_per_chip, "flops_per_caption": per_caption,
                        "peak_flops_per_chip": chip.peak_flops, "call_seconds": compute_s},
            "communication": {"per_kind": comm, "wire_bytes_per_chip": wire, "seconds": comm_s},
            "captions_per_s_pod": per_s_pod}


def _si(x: float, unit: str) -> str:
    """1.23e9 -> "1.23 G{unit}": FLOPs and parameter counts for reading."""
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_encoding_plan(plan: dict[str, Any]) -> str:
    """The plan as a short, readable text block."""
    m = plan["memory"]
    lines = [f"{plan['topology']}: text encoding ({_si(plan['parameters'], 'parameters')}, {plan['layout']}), "
             f"mesh {plan['mesh']}, {plan['captions_per_call']} captions per call "
             f"({plan['captions_per_chip']:g} per chip), T5 {plan['t5_tokens']} + CLIP {plan['clip_tokens']} tokens",
             f"Parameters per chip: {gib(plan['params_per_chip_bytes'])}"]
    if not m["fits"] and "compiler" in plan:
        return "\n".join(lines + [f"DOES NOT FIT. The TPU compiler says: {plan['compiler']}"])
    lines.append(f"Memory per chip: {gib(m['compiled_total_bytes'])} of {gib(m['hbm_bytes'])} HBM -> "
                 + ("fits" if m["fits"] else "DOES NOT FIT") + f", headroom {gib(m['headroom_bytes'])} "
                 f"(temp {gib(m['temp_bytes'])})")
    c, k = plan["compute"], plan["communication"]
    if c["flops_per_caption"]:
        lines.append(f"Compute: {_si(c['flops_per_caption'], 'FLOP')} per caption; "
                     + ", ".join(f"{t * 1e3:.2f} ms per call at {mfu} MFU" for mfu, t in c["call_seconds"].items()))
    kinds = ", ".join(f"{kind} {v['count']}x {gib(v['wire_bytes'])}" for kind, v in k["per_kind"].items() if v["count"])
    comm_time = f"{k['seconds'] * 1e3:.2f} ms at ICI" if k["seconds"] is not None else "ICI bandwidth unpublished"
    lines.append(f"Communication per chip per call: {kinds or 'none'}; {comm_time}")
    lines.append("Captions/s per pod (the slower of compute and collectives): "
                 + ", ".join(f"{v:.4g} at {mfu} MFU" for mfu, v in plan["captions_per_s_pod"].items()))
    return "\n".join(lines)
