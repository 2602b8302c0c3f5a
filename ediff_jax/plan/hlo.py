"""Collectives in a compiled program's HLO text: what each kind moves per step.

XLA prints every instruction as `%name = SHAPE opcode(operands), ..., replica_groups=...`. On
TPU most collectives are asynchronous pairs (`all-gather-start` / `all-gather-done`): the
`-done` carries the result, so it is counted and the `-start` is not. Ops wrapped in
`async-start(...), calls=%comp` appear as plain ops inside `%comp` and are counted there.

Bytes per device on the wire follow the ring algorithms, with n the replica-group size and S the
result size: all-gather S(n-1)/n, reduce-scatter S(n-1), all-reduce 2S(n-1)/n, all-to-all
S(n-1)/n, collective-permute S. An op inside a while loop is counted once.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
              "u64": 8, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_OP = re.compile(r"(?P<name>%?[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+(?P<op>" + "|".join(KINDS)
                 + r")(?P<suffix>-start|-done)?\((?P<operand>%?[\w.\-]*)")
_ARRAY = re.compile(r"\b(" + "|".join(sorted(ITEM_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string, tuples summed: 'bf16[4,8]{1,0}' -> 64."""
    return sum(ITEM_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in
               _ARRAY.findall(shape))


def group_size(line: str, num_devices: int) -> int:
    """Devices in one replica group of a collective (all of them when the line does not say)."""
    listed = _GROUPS_LIST.search(line)
    if listed:
        return max(len([d for d in listed.group(1).split(",") if d]), 1)
    iota = _GROUPS_IOTA.search(line)
    return int(iota.group(2)) if iota else num_devices


def wire_bytes(kind: str, result_bytes: float, n: int) -> float:
    """Bytes one device sends for one collective (ring algorithms)."""
    if n <= 1:
        return 0.0
    return {"all-gather": result_bytes * (n - 1) / n, "reduce-scatter": result_bytes * (n - 1),
            "all-reduce": 2 * result_bytes * (n - 1) / n, "all-to-all": result_bytes * (n - 1) / n,
            "collective-permute": result_bytes}[kind]


def collectives(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
    """{kind: {"count", "result_bytes", "wire_bytes"}} over the program, per device."""
    out = {kind: {"count": 0, "result_bytes": 0.0, "wire_bytes": 0.0} for kind in KINDS}
    started: dict[str, int] = {}  # a -start's name -> its group size (the -done line does not repeat it)
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        if match.group("suffix") == "-start":
            started[match.group("name").lstrip("%")] = group_size(line, num_devices)
            continue
        n = (started.get(match.group("operand").lstrip("%"), num_devices) if match.group("suffix") == "-done"
             else group_size(line, num_devices))
        kind, size = match.group("op"), shape_bytes(match.group("shape"))
        out[kind]["count"] += 1
        out[kind]["result_bytes"] += size
        out[kind]["wire_bytes"] += wire_bytes(kind, size, n)
    return out
