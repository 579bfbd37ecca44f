"""Training checkpoints with megatron.core.dist_checkpointing: atomic, keep-last-N, resharding on load.

Layout (shared with `megatron-apo convert`):
    <dir>/latest                      text file: the newest complete step (Megatron-LM's convention)
    <dir>/iter_0000012/megatron_apo.json   {"model_config": ..., "step": ..., "run_config": ..., ...}
    <dir>/iter_0000012/model/         dist checkpoint of the policy (GPTModel.sharded_state_dict())
    <dir>/iter_0000012/optim/         dist checkpoint of the optimizer (dp_reshardable: any DP size on load, same TP/PP)
    <dir>/iter_0000012/rng/rank_*.pt  per-rank RNG states (only loaded when the world size is unchanged)
    <dir>/iter_0000012/extra.pt       controller state (data position, answer memory, fleet version)

A save writes into `iter_X.tmp-<pid>` and renames it when every rank has finished, then updates `latest`
atomically: a crash (even SIGKILL) during a save leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_apo.models.megatron_checkpoint import METADATA_FILE as META_FILE
from megatron_apo.models.megatron_checkpoint import resolve_checkpoint
from megatron_apo.models.sharding import unwrap

OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}  # any DP on load (same TP/PP)
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete iteration folders, oldest first (temporary folders from a crashed save are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _ITER_RE.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_ITER_RE.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete iteration folder (per `latest`, else the highest), or None when there is none."""
    return resolve_checkpoint(ckpt_dir) if list_checkpoints(ckpt_dir) else None


def read_metadata(path: str | Path) -> dict:
    with open(resolve_checkpoint(path) / META_FILE) as f:
        return json.load(f)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(s: str | None) -> str:
    obj = [s]
    if dist.is_initialized():
        dist.broadcast_object_list(obj, src=0)
    return obj[0]


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model_chunks: list,
    optimizer=None,
    metadata: dict | None = None,
    extra: dict | None = None,
    keep_last: int = 2,
) -> Path:
    """Collective: every trainer rank calls it. Returns the final iteration folder."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iter_dir_name(step)
    tmp = Path(_broadcast_str(str(ckpt_dir / f"{final.name}.tmp-{os.getpid()}")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        for sub in ("rng", "model", "optim"):
            (tmp / sub).mkdir(parents=True)
    _barrier()
    model_sd = _model_sharded_state_dict(model_chunks)
    dist_checkpointing.save(model_sd, str(tmp / "model"))
    if optimizer is not None and _has_state(optimizer):  # no update yet (e.g. every step skipped): nothing to save
        optim_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model_chunks), metadata=OPTIM_SHARDING)
        dist_checkpointing.save({"optimizer": optim_sd}, str(tmp / "optim"))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        meta = dict(metadata or {}, step=step, world_size=dist.get_world_size() if dist.is_initialized() else 1)
        if extra is not None:
            torch.save(extra, tmp / "extra.pt")
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2, default=str)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(ckpt_dir, step)
        for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _has_state(optimizer) -> bool:
    return any(bool(sub.optimizer.state) for sub in getattr(optimizer, "chained_optimizers", [optimizer]))


def _write_latest(ckpt_dir: Path, step: int) -> None:
    tmp = ckpt_dir / f".latest.tmp-{os.getpid()}"
    tmp.write_text(f"{step}\n")
    os.replace(tmp, ckpt_dir / "latest")


def _model_sharded_state_dict(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return unwrap(model_chunks[0]).sharded_state_dict()
    sd = {}
    for i, m in enumerate(model_chunks):
        sd[f"model{i}"] = unwrap(m).sharded_state_dict()
    return sd


def load_model_weights(path: str | Path, model_chunks: list) -> dict:
    """Loads only the model weights (any TP/PP/DP layout, either layer spec) from an iteration folder or
    checkpoint dir: a checkpoint converted or trained with the local spec loads into a Transformer Engine
    model and back (models.spec_interchange)."""
    from megatron_apo.models.spec_interchange import load_any_spec, load_state_checked

    it = resolve_checkpoint(path)
    sd, dropped = load_any_spec(_model_sharded_state_dict(model_chunks), it / "model")
    if len(model_chunks) == 1:
        load_state_checked(unwrap(model_chunks[0]), sd, dropped, str(it))
    else:
        for i, m in enumerate(model_chunks):
            load_state_checked(unwrap(m), sd[f"model{i}"], [d for d in dropped if d.startswith(f"model{i}.")], str(it))
    return read_metadata(it)


def _restore_adam_steps(optimizer) -> None:
    """Gives every parameter its own Adam `step` again, equal to the checkpoint's.

    With torch's Adam (no Apex/TE FusedAdam, as on CPU), megatron-core 0.16 checkpoints `step` only in the
    param groups. Its loader puts ONE shared tensor into every parameter's state, and the `dp_reshardable`
    parameter state then copies the dummy step of the freshly allocated state (1) into it. Left as is,
    bias correction restarts at 1 after every resume, and the shared tensor is incremented once per parameter
    at each update. The param groups still carry the saved step, so each parameter gets a fresh copy of it.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st is not None and isinstance(st.get("step"), torch.Tensor):  # FusedAdam has no per-param step
                    old = st["step"]
                    st["step"] = torch.tensor(float(group["step"]), dtype=old.dtype, device=old.device)


def load_checkpoint(path: str | Path, model_chunks: list, optimizer=None) -> tuple[dict, Any]:
    """Restores model, optimizer and (same world size only) RNG states. Returns (metadata, extra)."""
    from megatron.core import dist_checkpointing

    it = resolve_checkpoint(path)
    meta = load_model_weights(it, model_chunks)
    if optimizer is not None and (it / "optim" / "metadata.json").is_file():
        # A fresh Adam has no per-param state (no "step") yet; megatron needs it allocated before a load.
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            if hasattr(sub, "_init_optimizer_states_with_dummy_values") and not sub.optimizer.state:
                sub._init_optimizer_states_with_dummy_values()
        optim_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model_chunks), is_loading=True,
                                                metadata=OPTIM_SHARDING)
        loaded = dist_checkpointing.load({"optimizer": optim_sd}, str(it / "optim"))
        with torch.no_grad():  # fp32 params: the main params are views of the (grad-requiring) model params
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = it / "rng" / f"rank_{rank:05d}.pt"
    if meta.get("world_size") == world and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    extra = torch.load(it / "extra.pt", weights_only=False) if (it / "extra.pt").is_file() else None
    return meta, extra
