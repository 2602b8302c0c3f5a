"""Published figures of the TPU generations the planner compiles for, per chip.

Peak dense bf16 FLOP/s come from `ediff_jax.flops.KNOWN_PEAKS` (one table). HBM and the
inter-chip interconnect (ICI) bandwidth are Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4,
/v5e, /v5p, /v6e): HBM 32 GiB, 16 GB, 95 GiB and 32 GB; ICI 1,600, 4,800 and 3,584 Gbps per
chip for v5e, v5p and v6e. The v4 page gives no per-chip ICI figure, so v4 plans report
communication bytes without a time.
"""

from __future__ import annotations

import dataclasses

from ediff_jax.flops import KNOWN_PEAKS


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # the topology-name prefix: "v5e" in "v5e:16x16"
    device_kind: str  # what jax reports
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    ici_bytes_per_s: float | None  # per chip, all links; None: not published


CHIPS = {
    "v4": Chip("v4", "TPU v4", KNOWN_PEAKS["TPU v4"], 32 * 2**30, None),
    # "16 GB" on the page is GiB: the TPU compiler's out-of-memory message gives v5e 15.75 GiB available,
    # more than 16e9 bytes (14.9 GiB), which would call programs it accepts too big.
    "v5e": Chip("v5e", "TPU v5 lite", KNOWN_PEAKS["TPU v5 lite"], 16 * 2**30, 1600e9 / 8),
    "v5p": Chip("v5p", "TPU v5", KNOWN_PEAKS["TPU v5p"], 95 * 2**30, 4800e9 / 8),
    "v6e": Chip("v6e", "TPU v6 lite", KNOWN_PEAKS["TPU v6 lite"], 32 * 10**9, 3584e9 / 8),
}


def chip_for(topology: str) -> Chip:
    """The chip of a topology name such as "v5e:2x2" or "v5p:4x4x4"."""
    generation = topology.split(":", 1)[0].strip().lower()
    if generation not in CHIPS or ":" not in topology:
        raise ValueError(f"Unknown TPU topology {topology!r}: give GENERATION:SHAPE with a generation in "
                         f"{sorted(CHIPS)}, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4, v6e:16x16, v4:2x2x1.")
    return CHIPS[generation]
