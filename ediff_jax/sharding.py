"""Parameter shardings from ordered regex rules (big_vision style), with FSDP.

A rule list is `[(regex, rule), ...]`; each parameter's '/'-joined path (e.g.
`"down_0_0/conv1/kernel"`) is matched with `re.fullmatch` against the regexes in order and
the first match decides. A rule is one of

* `"replicate"`: every device holds the whole tensor;
* `"fsdp"`: tensors with at least `min_size` elements per device are split along their
  largest dimension divisible by the `fsdp` mesh axis size (the later one on ties);
  smaller tensors, or ones with no divisible dimension, are replicated, since gathering
  them would cost more latency than their memory is worth;
* an explicit PartitionSpec-like tuple such as `(None, None, None, "fsdp")`: one entry per
  leading dimension (missing trailing entries mean not split), each None, a mesh axis
  name, or a tuple of axis names.

Rules are JSON-serialisable (lists work as tuples), so they can live in a config:
`config.sharding.rules = [[".*/kernel", "fsdp"], [".*", "replicate"]]`. `rules_from_config`
appends the default catch-all `(".*", "fsdp")`.

Parameters stacked for an expert ensemble (`[E, ...]`) are matched on their per-expert
shape: the expert dimension goes on the `expert` mesh axis when there is one and it
divides E, and the rule (FSDP or explicit) applies to the remaining dimensions, so one
rule list serves a single model and an ensemble.

Optimizer state, EMA copies and any other tree that holds parameter-shaped leaves are
sharded like the parameter they mirror (`opt_state_shardings`, `mirror_param_specs`);
everything else (step counts, RNG keys) is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence, Union

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

REPLICATE = "replicate"
FSDP = "fsdp"
AxisEntry = Union[None, str, tuple[str, ...]]
Rule = Union[str, tuple[AxisEntry, ...]]
DEFAULT_RULES: tuple[tuple[str, Rule], ...] = ((".*", FSDP),)
# Tensors smaller than this (elements per device, 1 MiB in float32) stay replicated under
# "fsdp": the all-gather latency would outweigh the memory saved.
DEFAULT_FSDP_MIN_SIZE = 2**18


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """One validated (regex, rule) pair; `index` is its position, for error messages."""

    pattern: str
    regex: re.Pattern
    rule: Rule
    index: int

    def describe(self) -> str:
        return f"sharding rule #{self.index} ({self.pattern!r} -> {self.rule!r})"


def _normalise_rule(rule: Any, index: int, pattern: str) -> Rule:
    where = f"Sharding rule #{index} ({pattern!r} -> {rule!r})"
    if isinstance(rule, str):
        if rule not in (REPLICATE, FSDP):
            raise ValueError(
                f"{where}: a string rule must be {REPLICATE!r} or {FSDP!r}; for a single split axis write a "
                f"spec such as [null, {rule!r}] (one entry per dimension)."
            )
        return rule
    if not isinstance(rule, (list, tuple)):
        raise ValueError(f"{where}: a rule is {REPLICATE!r}, {FSDP!r} or a list of mesh axis names/null per dimension.")
    entries: list[AxisEntry] = []
    for entry in rule:
        if entry is None or isinstance(entry, str):
            entries.append(entry)
        elif isinstance(entry, (list, tuple)) and entry and all(isinstance(a, str) for a in entry):
            entries.append(tuple(entry))
        else:
            raise ValueError(
                f"{where}: entry {entry!r} must be null, a mesh axis name, or a non-empty list of axis names."
            )
    return tuple(entries)


def parse_rules(pairs: Iterable[Any]) -> tuple[ShardingRule, ...]:
    """Validates `[(regex, rule), ...]` (tuples or JSON lists) and compiles the regexes."""
    parsed = []
    for index, pair in enumerate(pairs):
        if isinstance(pair, ShardingRule):
            parsed.append(dataclasses.replace(pair, index=index))
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(
                f"Sharding rule #{index} {pair!r} must be a pair [regex, rule], e.g. ['.*/kernel', 'fsdp']."
            )
        pattern, rule = pair
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"Sharding rule #{index}: pattern {pattern!r} is not a valid regular expression ({e}); fix it "
                "in the sharding rules (patterns are Python `re` syntax, matched against the whole path)."
            ) from e
        parsed.append(ShardingRule(pattern, regex, _normalise_rule(rule, index, pattern), index))
    return tuple(parsed)


def rules_from_config(pairs: Iterable[Any] | None) -> tuple[ShardingRule, ...]:
    """Config rules followed by the default catch-all `(".*", "fsdp")`."""
    return parse_rules([*(pairs or ()), *DEFAULT_RULES])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined names of a pytree key path: ('down_0_0', 'conv1', 'kernel') -> 'down_0_0/conv1/kernel'."""
    return "/".join(_key_name(k) for k in path)


def _axis_size(mesh: Mesh, entry: AxisEntry) -> int:
    names = (entry,) if isinstance(entry, str) else (entry or ())
    return math.prod(mesh.shape[n] for n in names)


def _entry_axes(entry: AxisEntry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else (entry or ())


def _explicit_spec(rule: ShardingRule, path: str, shape: tuple[int, ...], inner: tuple[int, ...],
                   mesh: Mesh, offset: int) -> tuple[AxisEntry, ...]:
    spec: tuple[AxisEntry, ...] = rule.rule  # type: ignore[assignment]
    where = f"{rule.describe()} does not fit parameter {path!r} of shape {shape}"
    if len(spec) > len(inner):
        raise ValueError(
            f"{where}: the spec has {len(spec)} entries but the parameter has {len(inner)} dimensions"
            f"{' (after the expert axis)' if offset else ''}. Give at most one entry per dimension, or narrow the "
            "regex so that it does not match this parameter."
        )
    used: list[str] = []
    for dim, entry in enumerate(spec):
        for axis in _entry_axes(entry):
            if axis not in mesh.shape:
                raise ValueError(
                    f"{where}: mesh axis {axis!r} does not exist; the mesh has axes {tuple(mesh.axis_names)}. "
                    "Use one of those in the rule, or add the axis to config.mesh."
                )
            if axis in used:
                raise ValueError(
                    f"{where}: mesh axis {axis!r} is used twice; a mesh axis can split only one dimension."
                )
            used.append(axis)
        size = _axis_size(mesh, entry)
        if inner[dim] % size:
            raise ValueError(
                f"{where}: dimension {dim + offset} has size {inner[dim]}, which mesh axes {_entry_axes(entry)} "
                f"(size {size}) do not divide. Split another dimension, use 'fsdp' (which picks a divisible one) "
                "or 'replicate' for this parameter."
            )
    return spec


def _fsdp_spec(inner: tuple[int, ...], local_elements: int, mesh: Mesh, fsdp_axis: str,
               min_size: int) -> tuple[AxisEntry, ...]:
    n = mesh.shape.get(fsdp_axis, 1)
    if n <= 1 or local_elements < min_size:
        return ()
    divisible = [(size, dim) for dim, size in enumerate(inner) if size % n == 0]
    if not divisible:
        return ()
    _, dim = max(divisible)  # largest dimension; the later one on ties (e.g. a conv's output channels)
    return tuple([None] * dim + [fsdp_axis])


def _leaf_spec(path: str, shape: tuple[int, ...], rules: Sequence[ShardingRule], mesh: Mesh, *,
               fsdp_axis: str, min_size: int, stacked_experts: bool, expert_axis: str) -> P:
    lead: tuple[AxisEntry, ...] = ()
    inner, expert_shards = shape, 1
    if stacked_experts:
        if not shape:
            raise ValueError(
                f"Parameter {path!r} is a scalar but stacked_experts=True expects a leading expert axis on every "
                "leaf; stack the experts with experts.stack_experts or pass stacked_experts=False."
            )
        inner = shape[1:]
        n = mesh.shape.get(expert_axis, 1)
        if n > 1 and shape[0] % n == 0:
            lead, expert_shards = (expert_axis,), n
        else:
            lead = (None,)
    rule = next((r for r in rules if r.regex.fullmatch(path)), None)
    if rule is None:
        raise ValueError(
            f"No sharding rule matches parameter {path!r} of shape {shape}; rules: "
            f"{[(r.pattern, r.rule) for r in rules]}. End the rules with a catch-all such as ('.*', 'fsdp') "
            "(rules_from_config adds it)."
        )
    if rule.rule == REPLICATE:
        rest: tuple[AxisEntry, ...] = ()
    elif rule.rule == FSDP:
        rest = _fsdp_spec(inner, math.prod(shape) // expert_shards, mesh, fsdp_axis, min_size)
    else:
        rest = _explicit_spec(rule, path, shape, inner, mesh, offset=len(lead))
        if lead == (expert_axis,) and expert_axis in {a for e in rest for a in _entry_axes(e)}:
            lead = (None,)  # the rule put the expert mesh axis on an inner dimension itself
    spec = (*lead, *rest)
    while spec and spec[-1] is None:  # P(None, None) == P(): keep specs canonical for comparisons
        spec = spec[:-1]
    return P(*spec)


def param_partition_specs(abstract_params: Any, rules: Iterable[Any], mesh: Mesh, *,
                          fsdp_axis: str = "fsdp", min_size: int = DEFAULT_FSDP_MIN_SIZE,
                          stacked_experts: bool = False, expert_axis: str = "expert") -> Any:
    """A PartitionSpec per parameter (same tree structure), from the first matching rule.

    `abstract_params` holds arrays or ShapeDtypeStructs (e.g. from `jax.eval_shape`).
    Raises ValueError naming the parameter, its shape and the fix when a rule cannot apply.
    """
    if min_size < 0:
        raise ValueError(f"min_size={min_size} must be >= 0 (elements per device below which FSDP replicates).")
    parsed = parse_rules(rules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    specs = [_leaf_spec(path_str(p), tuple(np.shape(x)), parsed, mesh, fsdp_axis=fsdp_axis, min_size=min_size,
                        stacked_experts=stacked_experts, expert_axis=expert_axis) for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, specs)


def to_named_shardings(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shardings_for_tree(abstract_params: Any, rules: Iterable[Any], mesh: Mesh, **kwargs: Any) -> Any:
    """NamedShardings for a parameter tree (see `param_partition_specs` for the keyword arguments)."""
    return to_named_shardings(param_partition_specs(abstract_params, rules, mesh, **kwargs), mesh)


def encoder_shardings(params: Any, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """Where the frozen text encoders live on `mesh`: FSDP by default (each weight of at least
    `min_size` elements per device split over the `fsdp` axis, the rest replicated), whatever the
    UNet's rules say. eDiff-I's T5-XXL is 19 GB in float32, more than a v5e chip's HBM, so it can
    only be loaded, cached or run there split (`python -m ediff_jax.plan --encode`)."""
    return shardings_for_tree(params, rules_from_config(()), mesh, min_size=min_size)


def encoder_leaf_sharding(mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """`encoder_shardings` one leaf at a time, as the weight loaders place them: (path, shape) -> sharding,
    so no device ever holds a whole encoder while it is read."""
    rules = rules_from_config(())

    def choose(path: Sequence[Any], shape: tuple[int, ...]) -> NamedSharding:
        spec = _leaf_spec("/".join(str(p) for p in path), tuple(shape), rules, mesh, fsdp_axis="fsdp",
                          min_size=min_size, stacked_experts=False, expert_axis="expert")
        return NamedSharding(mesh, spec)

    return choose


def _key_names(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in path)


def mirror_param_specs(tree: Any, abstract_params: Any, param_specs: Any) -> Any:
    """Specs for a tree that holds copies of the parameters (EMA dicts, optimizer moments, snapshots).

    A leaf whose key path ends with a parameter's path (the longest such) and has that
    parameter's shape gets the parameter's spec; every other leaf is replicated.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}
    spec_leaves = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
    param_leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    if len(spec_leaves) != len(param_leaves):
        raise ValueError(
            f"param_specs has {len(spec_leaves)} leaves but abstract_params has {len(param_leaves)}; compute the "
            "specs from these parameters with param_partition_specs."
        )
    for (path, leaf), spec in zip(param_leaves, spec_leaves):
        by_path[_key_names(path)] = (tuple(np.shape(leaf)), spec)

    def leaf_spec(path: Sequence[Any], leaf: Any) -> P:
        names, shape = _key_names(path), tuple(np.shape(leaf))
        for start in range(len(names) + 1):  # longest suffix first; () is a bare-array parameter tree
            found = by_path.get(names[start:])
            if found is not None:
                return found[1] if found[0] == shape else P()
        return P()

    return jax.tree_util.tree_map_with_path(leaf_spec, tree)


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_specs: Any, mesh: Mesh, *,
                        optimizer: optax.GradientTransformation | None = None) -> Any:
    """NamedShardings for optimizer state: parameter-shaped leaves (Adam's mu, nu) like their parameter.

    With `optimizer`, the parameter-shaped parts are found structurally by
    `optax.tree_map_params`; without it, by key-path suffix (`mirror_param_specs`). Leaves
    whose shape differs from their parameter's (factored moments) and scalars (counts)
    are replicated. Works for vmapped (expert-stacked) states, whose leaves carry the
    same leading expert axis as the stacked parameters.
    """
    if optimizer is None:
        return to_named_shardings(mirror_param_specs(abstract_opt_state, abstract_params, param_specs), mesh)
    replicated = NamedSharding(mesh, P())

    def like_param(value: Any, param: Any, spec: P) -> NamedSharding:
        return NamedSharding(mesh, spec) if np.shape(value) == np.shape(param) else replicated

    return optax.tree_map_params(optimizer, like_param, abstract_opt_state, abstract_params, param_specs,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, P))


def train_state_shardings(abstract_state: Any, rules: Iterable[Any], mesh: Mesh, *, params_field: str = "params",
                          opt_state_field: str = "opt_state", optimizer: optax.GradientTransformation | None = None,
                          **spec_kwargs: Any) -> Any:
    """Shardings for a train-state dataclass (e.g. training.TrainState): the whole state in one call.

    `params_field` is sharded by the rules; `opt_state_field` by `opt_state_shardings`;
    every other field (EMA params or a dict of EMAs, snapshots) mirrors the parameters
    where its leaves are parameter-shaped, and is replicated otherwise (step, rng).
    `spec_kwargs` go to `param_partition_specs` (fsdp_axis, min_size, stacked_experts, ...).
    """
    if not dataclasses.is_dataclass(abstract_state):
        raise TypeError(
            f"train_state_shardings expects a dataclass state (e.g. TrainState), got {type(abstract_state)}."
        )
    params = getattr(abstract_state, params_field)
    specs = param_partition_specs(params, rules, mesh, **spec_kwargs)
    out: dict[str, Any] = {}
    for field in dataclasses.fields(abstract_state):
        value = getattr(abstract_state, field.name)
        if field.name == params_field:
            out[field.name] = to_named_shardings(specs, mesh)
        elif field.name == opt_state_field:
            out[field.name] = opt_state_shardings(value, params, specs, mesh, optimizer=optimizer)
        else:
            out[field.name] = to_named_shardings(mirror_param_specs(value, params, specs), mesh)
    return dataclasses.replace(abstract_state, **out)


def sharding_summary(abstract_params: Any, param_specs: Any, mesh: Mesh) -> str:
    """A table (path, shape, spec, per-device shape) for the log, so a run shows how it is split."""
    rows = []
    spec_leaves = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0], spec_leaves):
        shape = tuple(np.shape(leaf))
        local = tuple(d // _axis_size(mesh, spec[i]) if i < len(spec) else d for i, d in enumerate(shape))
        rows.append((path_str(path), str(shape), str(spec), str(local)))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("param", "shape", "spec", "per device"))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("param", "shape", "spec", "per device"), widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def sharded_bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    """Bytes one device holds for `abstract_tree` under `shardings` (to check FSDP's memory saving)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        local = sharding.shard_shape(tuple(np.shape(leaf)))
        total += math.prod(local) * np.dtype(leaf.dtype).itemsize
    return total
