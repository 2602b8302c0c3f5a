"""`--sweep`: plan every mesh shape (data x fsdp x expert), remat off/on and per-chip batch for one
topology, and rank the configurations that fit by predicted throughput.

Each candidate is the config with `mesh`, `model.remat` and `train.batch_size` (per-chip batch x
chips) set, planned by `compile.plan_train_step`; a candidate the compiler refuses for HBM, or that
the config validation refuses, becomes a row with its reason. Larger per-chip batches of a mesh and
remat setting whose smaller batch ran out of HBM are not compiled (memory grows with the batch)
and say so. The parsing and the math here need no compiler; `plan_all` takes the planner as an argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import ml_collections

MESH_AXES = ("data", "fsdp", "expert")
REMAT = {"off": False, "on": True}
BATCH_MULTIPLES = (1, 2, 4)  # the default per-chip batches: the config's, x2 and x4
MFU = "40%"  # the compute scenario of the prediction (one of compile.MFU_SCENARIOS)

Planner = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: tuple[tuple[str, int], ...]  # (axis, size) in MESH_AXES order, size-1 fsdp/expert axes left out
    remat: bool
    per_chip_batch: int  # the global batch over all chips, as the plan counts it (an expert axis replicates it)

    def describe(self) -> str:
        remat = "on" if self.remat else "off"
        return f"mesh {_mesh_text(dict(self.mesh))}, remat {remat}, {self.per_chip_batch} per chip"


# --- flags ----------------------------------------------------------------------------------------


def parse_batches(text: str) -> list[int]:
    """`--sweep_batches "4,8,16"` -> [4, 8, 16] (sorted, distinct): per-chip batches, positive integers."""
    items = [s.strip() for s in text.split(",")]
    if not all(s.isdigit() and int(s) > 0 for s in items):
        raise ValueError(f"--sweep_batches={text!r}: give per-chip batches as positive integers separated by "
                         "commas, e.g. --sweep_batches=4,8,16.")
    return sorted({int(s) for s in items})


def parse_remat(text: str) -> list[bool]:
    """`--sweep_remat "off,on"` -> [False, True]."""
    items = [s.strip().lower() for s in text.split(",")]
    if not items or any(s not in REMAT for s in items):
        raise ValueError(f"--sweep_remat={text!r}: give off, on or off,on, e.g. --sweep_remat=on.")
    return sorted({REMAT[s] for s in items})


def parse_meshes(text: str) -> list[dict[str, int]]:
    """`--sweep_meshes "data=4;data=2,fsdp=2"` -> [{"data": 4}, {"data": 2, "fsdp": 2}]; unnamed axes are 1."""
    example = "e.g. --sweep_meshes='data=4;data=2,fsdp=2'"
    meshes = []
    for part in text.split(";"):
        mesh: dict[str, int] = {}
        for item in part.split(","):
            axis, _, size = (s.strip() for s in item.partition("="))
            if axis not in MESH_AXES or not size.isdigit() or int(size) < 1 or axis in mesh:
                raise ValueError(f"--sweep_meshes={text!r}: {item.strip()!r} is not AXIS=SIZE with an axis of "
                                 f"{', '.join(MESH_AXES)} (each once per mesh) and a positive size; {example}.")
            mesh[axis] = int(size)
        meshes.append(mesh)
    return meshes


# --- candidates -----------------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def num_experts(config: ml_collections.ConfigDict) -> int:
    """Experts of the last phase, the one `plan_train_step` compiles (1: a single model)."""
    phases = config.experts.phases
    return len(phases[-1]) if phases else 1


def mesh_shapes(num_devices: int, experts: int) -> list[dict[str, int]]:
    """Every data x fsdp (x expert) factorisation of the devices; an expert axis only with a size that
    divides the expert count, since the sharding replicates experts over an axis that does not divide them."""
    shapes = []
    for expert in divisors(math.gcd(num_devices, experts)):
        for fsdp in divisors(num_devices // expert):
            shapes.append({"data": num_devices // expert // fsdp, "fsdp": fsdp, "expert": expert})
    return shapes


def check_meshes(meshes: Sequence[dict[str, int]], num_devices: int, experts: int, topology: str) -> None:
    """`--sweep_meshes` against the topology and the config: the sizes multiply to the device count, and an
    expert axis divides the expert count."""
    for mesh in meshes:
        used = math.prod(mesh.values())
        if used != num_devices:
            raise ValueError(f"--sweep_meshes: {_mesh_text(mesh)} uses {used} devices but {topology} has "
                             f"{num_devices}; make the sizes multiply to {num_devices}.")
        expert = mesh.get("expert", 1)
        if experts % expert:
            raise ValueError(f"--sweep_meshes: expert={expert} does not divide the config's {experts} expert(s); "
                             f"use an expert size in {divisors(experts)}.")


def default_batches(config: ml_collections.ConfigDict, num_devices: int) -> list[int]:
    """The config's per-chip batch (at least 1), x2 and x4."""
    base = max(int(config.train.batch_size) // num_devices, 1)
    return [base * k for k in BATCH_MULTIPLES]


def candidates(meshes: Sequence[dict[str, int]], remats: Sequence[bool], batches: Sequence[int]) -> list[Candidate]:
    """Meshes x remat x per-chip batch, batches ascending within each mesh and remat (see `plan_all`)."""
    return [Candidate(_mesh_key(mesh), remat, batch) for mesh in meshes for remat in remats
            for batch in sorted(batches)]


def _mesh_key(mesh: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple((axis, int(mesh.get(axis, 1))) for axis in MESH_AXES
                 if axis == "data" or mesh.get(axis, 1) != 1)


def _mesh_text(mesh: dict[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in _mesh_key(mesh))


def check_config_mesh(config: ml_collections.ConfigDict) -> None:
    """The sweep sets config.mesh.data/fsdp/expert; another axis (or `dcn`) would change what is planned."""
    other = sorted(k for k, v in config.mesh.items() if k not in MESH_AXES and v is not None)
    if other:
        raise ValueError(f"--sweep plans one slice over the axes {', '.join(MESH_AXES)}, but config.mesh also sets "
                         f"{other}; remove them from the config to sweep.")


def apply(config: ml_collections.ConfigDict, candidate: Candidate, num_devices: int) -> ml_collections.ConfigDict:
    """A copy of `config` set to the candidate: the mesh axes, model.remat and the global batch."""
    config = config.copy_and_resolve_references()
    mesh = dict(candidate.mesh)
    config.mesh.data = mesh["data"]
    config.mesh.fsdp = mesh.get("fsdp")  # None: no such axis
    config.mesh.expert = mesh.get("expert")
    config.model.remat = candidate.remat
    config.train.batch_size = candidate.per_chip_batch * num_devices
    return config


# --- prediction -----------------------------------------------------------------------------------


def predicted_images_per_s(global_batch: int, compute_s: float, comm_s: float | None) -> float:
    """Images per second per pod from one step's compute time (at the assumed MFU) and collective time.

    XLA on TPU issues collectives asynchronously and overlaps them with compute, so a step takes at
    least the longer of the two, not their sum: compute-bound when the collectives hide behind the
    compute, communication-bound otherwise. This is the optimistic end (perfect overlap), good for
    ranking configurations, not a measurement. Without a published ICI bandwidth (`comm_s` None) only
    compute counts.
    """
    step_s = max(compute_s, comm_s or 0.0)
    return global_batch / step_s


def predict(plan: dict[str, Any]) -> tuple[float | None, str]:
    """(images/s per pod, what bounds the step) from a plan's own step times and its compute-bound verdict."""
    compute_s = plan["compute"]["step_seconds"].get(MFU)
    if not compute_s:  # the compiler gave no FLOP count
        return None, "unknown"
    comm_s = plan["communication"]["seconds"]
    bound = {True: "compute", False: "communication", None: "compute (no ICI figure)"}[
        plan["communication"][f"compute_bound_at_{MFU}"]]
    return predicted_images_per_s(plan["global_batch"], compute_s, comm_s), bound


# --- the sweep ------------------------------------------------------------------------------------

FITS, NO_HBM, REFUSED, SKIPPED = "fits", "out of HBM", "refused by the config checks", "not compiled"


def _row(candidate: Candidate, num_devices: int) -> dict[str, Any]:
    return {"mesh": dict(candidate.mesh), "remat": candidate.remat, "per_chip_batch": candidate.per_chip_batch,
            "global_batch": candidate.per_chip_batch * num_devices, "fits": False, "status": None,
            "images_per_s_pod": None, "bound": None, "reason": None, "plan": None}


def plan_candidate(config: ml_collections.ConfigDict, topology: str, candidate: Candidate, num_devices: int,
                   plan: Planner, does_not_fit: type[Exception]) -> dict[str, Any]:
    """One row: the candidate planned, or the reason it cannot run."""
    from ediff_jax.plan.compile import gib

    row = _row(candidate, num_devices)
    try:
        result = plan(apply(config, candidate, num_devices), topology)
    except does_not_fit as e:
        row.update(status=NO_HBM, reason=f"the TPU compiler ran out of HBM: {' '.join(str(e).split())}")
        return row
    except ValueError as e:
        row.update(status=REFUSED, reason=" ".join(str(e).split()))
        return row
    memory = result["memory"]
    row["plan"] = result
    if not memory["fits"]:
        row.update(status=NO_HBM, reason=f"needs {gib(memory['compiled_total_bytes'])} per chip, over the "
                                         f"{gib(memory['hbm_bytes'])} of HBM")
        return row
    ips, bound = predict(result)
    row.update(fits=True, status=FITS, images_per_s_pod=ips, bound=bound)
    return row


def plan_all(config: ml_collections.ConfigDict, topology: str, cands: Sequence[Candidate], num_devices: int,
              plan: Planner, does_not_fit: type[Exception],
              progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """Rows of every candidate, ranked (`rank_rows`). Once a per-chip batch runs out of HBM with a mesh and
    remat setting, its larger batches are recorded as not fitting without a compile: each would cost as much
    as a fitting one, and memory only grows with the batch."""
    rows, too_big = [], {}  # (mesh, remat) -> the per-chip batch that ran out of HBM
    for i, cand in enumerate(cands, 1):
        key = (cand.mesh, cand.remat)
        if key in too_big and cand.per_chip_batch > too_big[key]:
            row = _row(cand, num_devices)
            row.update(status=SKIPPED, reason=f"not compiled: {too_big[key]} per chip already runs out of HBM")
        else:
            progress(f"sweep {i}/{len(cands)}: {cand.describe()}")
            row = plan_candidate(config, topology, cand, num_devices, plan, does_not_fit)
            if row["status"] == NO_HBM:
                too_big.setdefault(key, cand.per_chip_batch)
        rows.append(row)
    return rank_rows(rows)


def rank_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that fit by predicted images/s, highest first (no prediction last; on a tie the one with
    more HBM headroom first), then those that do not, in sweep order."""
    fit = sorted((r for r in rows if r["fits"]),
                 key=lambda r: (-(r["images_per_s_pod"] or 0.0), r["plan"]["memory"]["compiled_total_bytes"]))
    return fit + [r for r in rows if not r["fits"]]


def best(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The first of the ranked rows, if it fits and has a prediction."""
    return rows[0] if rows and rows[0]["fits"] and rows[0]["images_per_s_pod"] else None


def run_sweep(config: ml_collections.ConfigDict, topology: str, batches: Sequence[int] | None = None,
          remats: Sequence[bool] = (False, True), meshes: Sequence[dict[str, int]] | None = None,
          progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The sweep for `topology` with the real planner: every mesh shape unless `meshes`, per-chip `batches`
    (default: the config's per-chip batch, x2, x4). Returns {"topology", "rows", "best"} (JSON-ready)."""
    from ediff_jax.plan.compile import DoesNotFit, plan_train_step, topology_devices

    check_config_mesh(config)
    n, experts = len(topology_devices(topology)), num_experts(config)
    if meshes is None:
        meshes = mesh_shapes(n, experts)
    check_meshes(meshes, n, experts, topology)
    cands = candidates(meshes, remats, batches or default_batches(config, n))
    rows = plan_all(config, topology, cands, n, plan_train_step, DoesNotFit, progress)
    return {"topology": topology, "chips": n, "rows": rows, "best": best(rows)}


# --- output ---------------------------------------------------------------------------------------


def _row_mesh(row: dict[str, Any]) -> str:
    return _mesh_text(row["mesh"])


def describe_best(row: dict[str, Any] | None) -> str:
    if row is None:
        return "best: none; no configuration fits. Try smaller --sweep_batches, --sweep_remat=on or more chips."
    return (f"best: mesh {_row_mesh(row)}, remat {'on' if row['remat'] else 'off'}, {row['per_chip_batch']} per chip "
            f"(global batch {row['global_batch']}): {row['images_per_s_pod']:.4g} images/s per pod, "
            f"{row['bound']}-bound")


def _align(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]


def format_sweep(rows: Sequence[dict[str, Any]], topology: str) -> str:
    """The ranked table, the configurations that do not fit with their reasons, and the best."""
    from ediff_jax.plan.compile import gib

    fit = [r for r in rows if r["fits"]]
    lines = [f"{topology}: {len(rows)} configurations, {len(fit)} fit. Predicted images/s per pod: compute at "
             f"{MFU} MFU, or the collectives' ICI time where that is longer (the step overlaps the two)."]
    if fit:
        table = [["#", "mesh", "remat", "per chip", "global", "HBM/chip", "temp", f"compute {MFU}", "collectives",
                  "bound", "images/s"]]
        for i, r in enumerate(fit, 1):
            p = r["plan"]
            comm = p["communication"]["seconds"]
            compute = p["compute"]["step_seconds"].get(MFU)
            table.append([str(i), _row_mesh(r), "on" if r["remat"] else "off", str(r["per_chip_batch"]),
                          str(r["global_batch"]), gib(p["memory"]["compiled_total_bytes"]),
                          gib(p["memory"]["temp_bytes"]), f"{compute * 1e3:.3g} ms" if compute else "?",
                          f"{comm * 1e3:.3g} ms" if comm is not None else "?", r["bound"],
                          f"{r['images_per_s_pod']:.4g}" if r["images_per_s_pod"] else "?"])
        lines += _align(table)
    misfits = [r for r in rows if not r["fits"]]
    if misfits:
        lines.append("Do not fit or cannot run:")
        table = [[_row_mesh(r), "on" if r["remat"] else "off", str(r["per_chip_batch"]), str(r["global_batch"]),
                  r["reason"]] for r in misfits]
        lines += ["  " + line for line in _align([["mesh", "remat", "per chip", "global", "reason"]] + table)]
    lines.append(describe_best(best(rows)))
    return "\n".join(lines)


# --- command-line checks --------------------------------------------------------------------------

SWEPT = {"config.mesh": "--sweep_meshes", "config.model.remat": "--sweep_remat"}


def config_overrides(argv: Sequence[str]) -> list[str]:
    """The dotted config fields a command line overrides: `--config.mesh.fsdp=2` -> "config.mesh.fsdp"
    (`--noconfig.model.remat` -> "config.model.remat")."""
    names = (arg.lstrip("-").split("=", 1)[0] for arg in argv if arg.startswith("-"))
    return [name.removeprefix("no") for name in names if name.startswith(("config.", "noconfig."))]


def check_overrides(overrides: Sequence[str], batches_given: bool) -> None:
    """A config override that the sweep would replace is refused, naming the sweep flag to use instead."""
    for field in overrides:
        for swept, flag in SWEPT.items():
            if field == swept or field.startswith(swept + "."):
                raise ValueError(f"--{field} is set by --sweep for each configuration; restrict the sweep with "
                                 f"{flag} instead, or drop --sweep.")
        if field == "config.train.batch_size" and batches_given:
            raise ValueError("--config.train.batch_size only sets the default per-chip batches of --sweep, and "
                             "--sweep_batches replaces them; drop one of the two.")
