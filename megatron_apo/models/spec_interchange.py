"""Checkpoints across layer specs: Transformer Engine (GPU) <-> megatron-core's local spec (CPU).

What differs between the two specs' checkpoints (docs/gpu.md, "Spec interchange"):
  * `_extra_state`: TE modules keep FP8 scaling metadata there. megatron-core gives its own linear layers
    an empty one, but TE's attention (`self_attention.core_attention`) and norm modules (e.g.
    `decoder.final_layernorm`) have one the local spec lacks, so a local-spec checkpoint misses them;
  * the fused pre-norms: TE's `self_attention.linear_qkv.layer_norm_weight` is the local spec's
    `input_layernorm.weight` (`mlp.linear_fc1.layer_norm_weight`: `pre_mlp_layernorm.weight`).
    megatron-core 0.16 stores both specs' norms under TE's spelling, but checkpoints written by older
    megatron-core or other tools may use the local one.

`load_any_spec` loads a dist checkpoint written by either spec into a model of either spec: a requested
tensor missing under its own spelling is read under the other one, and a requested `_extra_state` the
checkpoint does not hold is left at the module's fresh default (right for a run that does not resume FP8
scaling history). Anything else missing is still an error, named.
"""

from __future__ import annotations

from pathlib import Path

from megatron_apo.config import UserError

TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
LOCAL_TO_TE = {v: k for k, v in TE_TO_LOCAL.items()}
EXTRA_STATE = "_extra_state"


class CrossSpecError(UserError, ValueError):
    pass


def _swap_suffix(name: str, table: dict[str, str]) -> str | None:
    for a, b in table.items():
        if name == a or name.endswith("." + a):
            return name[: len(name) - len(a)] + b
    return None


def other_spelling(name: str) -> str | None:
    """The same tensor's name in the other spec, or None when both specs spell it alike."""
    return _swap_suffix(name, TE_TO_LOCAL) or _swap_suffix(name, LOCAL_TO_TE)


def local_spelling(name: str) -> str:
    """A parameter name in the local spec's spelling (identity for names both specs share)."""
    return _swap_suffix(name, TE_TO_LOCAL) or name


def te_spelling(name: str) -> str:
    return _swap_suffix(name, LOCAL_TO_TE) or name


def is_extra_state(name: str) -> bool:
    return name.endswith(EXTRA_STATE)


def stored_keys(model_dir: str | Path) -> set[str]:
    """Keys of every ShardedTensor / ShardedObject a dist checkpoint holds (no tensor data is read)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    keys = set(load_sharded_metadata(str(model_dir)).keys())
    return keys | {k.split("/shard_", 1)[0] for k in keys}  # ShardedObjects are listed per shard: "<key>/shard_i_n"


def adapt_to_checkpoint(sharded_state_dict: dict, stored: set[str]) -> tuple[list[str], list[str]]:
    """Re-keys a model's sharded state dict (in place) to what the checkpoint holds.

    Returns (renamed, dropped): sharded keys now read under the other spec's spelling, and the state-dict
    keys of `_extra_state` entries removed because the checkpoint has none.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    renamed, dropped = [], []

    def walk(d: dict, prefix: str) -> None:
        for name in list(d):
            value = d[name]
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")
            elif isinstance(value, (ShardedTensor, ShardedTensorFactory)) and value.key not in stored:
                other = other_spelling(value.key)
                if other is not None and other in stored:
                    value.key = other
                    renamed.append(other)
            elif isinstance(value, ShardedObject) and is_extra_state(value.key) and value.key not in stored:
                del d[name]
                dropped.append(prefix + name)

    walk(sharded_state_dict, "")
    return renamed, dropped


def missing_keys(sharded_state_dict: dict, stored: set[str]) -> list[str]:
    """Sharded keys the model asks for that the checkpoint does not hold (after `adapt_to_checkpoint`)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory

    out = []

    def walk(d: dict) -> None:
        for value in d.values():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(value, (ShardedBase, ShardedTensorFactory)) and value.key not in stored:
                out.append(value.key)

    walk(sharded_state_dict)
    return sorted(set(out))


def load_any_spec(sharded_state_dict: dict, model_dir: str | Path) -> tuple[dict, list[str]]:
    """`dist_checkpointing.load` that accepts a checkpoint of either spec. Returns (state dict, dropped keys)."""
    from megatron.core import dist_checkpointing

    stored = stored_keys(model_dir)
    _, dropped = adapt_to_checkpoint(sharded_state_dict, stored)
    missing = missing_keys(sharded_state_dict, stored)
    if missing:  # torch's own error here is a multi-page CheckpointException (a BaseException)
        raise CrossSpecError(f"{model_dir}: the checkpoint has no {', '.join(missing[:3])}"
                             f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}; "
                             "it was written for another model (config and weights disagree?)")
    return dist_checkpointing.load(sharded_state_dict, str(model_dir)), dropped


def load_state_checked(module, state: dict, dropped: list[str], where: str) -> None:
    """`module.load_state_dict` allowing exactly the `_extra_state` entries the checkpoint did not hold."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    allowed = set(dropped)  # dotted paths; for a chunk of a multi-chunk dict they carry a "model<i>." prefix
    bad_missing = [k for k in missing
                   if not (is_extra_state(k) and (k in allowed or any(d.endswith("." + k) for d in allowed)))]
    if bad_missing or unexpected:
        raise CrossSpecError(f"{where}: the checkpoint does not match the model: missing {bad_missing[:4]}, "
                             f"unexpected {list(unexpected)[:4]} (config and weights disagree?)")
