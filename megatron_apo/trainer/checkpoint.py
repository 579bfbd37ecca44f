"""Training checkpoints with megatron.core.dist_checkpointing: atomic, keep-last-N, resharding on load.

The layout's names belong to `models/megatron_checkpoint.py` (shared with `megatron-apo convert`):
    <dir>/latest                           text file: the newest complete step
    <dir>/latest_checkpointed_iteration.txt  the same, under the name Megatron-LM's tools read
    <dir>/iter_0000012/megatron_apo.json   {"model_config", "step", "world_size", "parallel", "optim_sharding",
                                            "fleet_version", "run_config", "guarded_config", "config_fingerprint",
                                            "metrics"} (JSON)
    <dir>/iter_0000012/model/              dist checkpoint of the policy (GPTModel.sharded_state_dict())
    <dir>/iter_0000012/optim/              dist checkpoint of the optimizer (`optim_sharding`: any DP size on load;
                                            another TP/PP needs checkpoint.reset_optimizer=true)
    <dir>/iter_0000012/rng/rank_*.pt       per-rank RNG states, tensors and numbers only (loaded with
                                            weights_only=True, and only when the world size is unchanged)
    <dir>/iter_0000012/extra.json          controller state (data position, answer memory), JSON
    <dir>/iter_0000012/checksums.json      CRC32 of every other file

A save writes into `iter_X.tmp-<pid>` and renames it when every rank has finished, then updates `latest`
atomically: a crash (even SIGKILL) during a save leaves the previous checkpoint intact and loadable. A failed
save (a full disk) removes its temporary folder and says why, naming the path; temporary folders left by a
killed run are removed when the next run starts (`clean_stale_tmp`, under the out_dir lock).

Every file of an iteration folder has a CRC32 in `<iter>/checksums.json`, computed at save (in parallel over the
ranks) and verified before any file of it is read: a damaged, missing or unlisted file is named, and a resume falls
back to the newest intact checkpoint (`resume_checkpoint`), saying so. A checkpoint without the manifest is refused
unless checkpoint.allow_unverified=true. Nothing this module writes is a pickle: a resume unpickles nothing of its
own (the torch_dist parts are megatron-core's, see docs/reliability.md "Security").
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException

from megatron_apo.config import UserError
from megatron_apo.diskio import DiskError, describe_os_error, find_os_error
from megatron_apo.logging_utils import get_logger
from megatron_apo.models.checksums import CHECKSUM_FILE, CheckpointCorrupt, checksum_files, verify_checkpoint
from megatron_apo.models.megatron_checkpoint import METADATA_FILE as META_FILE
from megatron_apo.models.megatron_checkpoint import (
    TMP_RE,
    iter_dir_name,
    list_iterations,
    resolve_checkpoint,
    write_latest,
)
from megatron_apo.models.sharding import unwrap

log = get_logger(__name__)

# dp_reshardable: any DP size on load, same TP/PP (megatron-core's fully_reshardable gathers the whole state on
# one rank per save, so it is not the default)
OPTIM_SHARDING = "dp_reshardable"
_RESHARDABLE = ("fully_reshardable", "fully_sharded_model_space")  # these load at any TP/PP
EXTRA_FILE = "extra.json"
_LEGACY_EXTRA = "extra.pt"  # written by older versions; read with weights_only=True


class OptimizerLayoutChanged(UserError, ValueError):
    """A resume at another TP/PP size from an optimizer state that cannot be resharded to it."""


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete iteration folders, oldest first (temporary folders from a crashed save are ignored)."""
    return list_iterations(ckpt_dir)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete iteration folder (per `latest`, else the highest), or None when there is none."""
    return resolve_checkpoint(ckpt_dir) if list_checkpoints(ckpt_dir) else None


def read_metadata(path: str | Path) -> dict:
    with open(resolve_checkpoint(path) / META_FILE) as f:
        return json.load(f)


def _rng_state() -> dict:
    """Plain data (tensors, ints, floats): loadable with torch.load(weights_only=True)."""
    from megatron.core import tensor_parallel

    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states()),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _parallel_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size()}


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
    """Collective: every trainer rank calls it. Returns the final iteration folder.

    Raises DiskError (one line: the path and e.g. "No space left on device") when the save fails; the temporary
    folder is removed then and the previous checkpoint stays `latest`.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iter_dir_name(step)
    tmp = Path(_broadcast_str(str(ckpt_dir / f"{final.name}.tmp-{os.getpid()}")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    layout = _parallel_layout()
    try:
        with _stop_signals_deferred():
            _save_into(tmp, rank, model_chunks, optimizer)
        sums = checksum_files(tmp)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException; collective
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial folder would keep a full disk full
        raise DiskError(getattr(find_os_error(e), "errno", None) or 0,
                        describe_os_error(e, tmp, f"checkpoint of step {step} not saved ({tmp.name} removed):"
                                          " writing")) from e
    err = None
    if rank == 0:
        try:
            meta = dict(metadata or {}, step=step, world_size=dist.get_world_size() if dist.is_initialized() else 1,
                        parallel=layout, optim_sharding=OPTIM_SHARDING)
            if extra is not None:
                (tmp / EXTRA_FILE).write_text(json.dumps(extra, indent=1) + "\n")  # JSON: nothing to unpickle
            with open(tmp / META_FILE, "w") as f:
                json.dump(meta, f, indent=2, default=str)
            sums.update(checksum_files(tmp, only=[EXTRA_FILE, META_FILE]))
            _write_json_atomic(tmp / CHECKSUM_FILE, {"algorithm": "crc32", "files": dict(sorted(sums.items()))})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_latest(ckpt_dir, step)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = DiskError(e.errno, describe_os_error(e, tmp, f"checkpoint of step {step} not saved ({tmp.name} "
                                                           "removed): writing"))
        else:
            for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    _raise_if_any_rank_failed(err)
    return final


def _stop_signals_deferred():
    """torch DCP's writer and queue-manager processes have no signal handler: started with SIGTERM/SIGUSR1
    blocked they survive a preemption signal sent to the whole job step (Slurm), which would otherwise kill
    them mid-save (a BrokenPipeError). The trainer's own handler runs right after the save."""
    from megatron_apo.trainer.lifecycle import signals_blocked

    return signals_blocked()


def _save_into(tmp: Path, rank: int, model_chunks: list, optimizer) -> None:
    from megatron.core import dist_checkpointing

    err = None
    if rank == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            for sub in ("rng", "model", "optim"):
                (tmp / sub).mkdir(parents=True)
        except OSError as e:
            err = e
    if _broadcast_str(str(err) if err else None) is not None:
        raise err if err is not None else OSError(f"rank 0 could not create {tmp}")
    model_sd = _model_sharded_state_dict(model_chunks)
    dist_checkpointing.save(model_sd, str(tmp / "model"))
    if optimizer is not None and _has_state(optimizer):  # no update yet (e.g. every step skipped): nothing to save
        optim_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model_chunks),
                                                metadata={"distrib_optim_sharding_type": OPTIM_SHARDING})
        dist_checkpointing.save({"optimizer": optim_sd}, str(tmp / "optim"))
    err = None
    try:
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    except OSError as e:
        err = e
    _raise_if_any_rank_failed(err)


def _raise_if_any_rank_failed(err: BaseException | None) -> None:
    """Collective: every rank raises when one failed (a lone failure would leave the others in a barrier)."""
    msgs = [str(err) if err else None]
    if dist.is_initialized():
        msgs = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, str(err) if err else None)
    if err is not None:
        raise err
    failed = [(r, m) for r, m in enumerate(msgs) if m]
    if failed:
        raise OSError(f"rank {failed[0][0]}: {failed[0][1]}")


def resume_checkpoint(ckpt_dir: str | Path, model_chunks: list, optimizer=None, allow_unverified: bool = False,
                      reset_optimizer: bool = False) -> tuple[dict | None, Any]:
    """Loads the newest intact checkpoint of `ckpt_dir`: (metadata, extra), or (None, None) when there is none.

    A damaged `latest` (a file that fails its checksum, or a part that does not load) is reported, naming the
    file, and the next older checkpoint is tried; the message says which one training resumes from. A checkpoint
    without checksums is refused (UnverifiedCheckpoint) unless `allow_unverified`.
    """
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        return None, None
    candidates = [latest] + [p for p in reversed(list_checkpoints(ckpt_dir)) if p != latest]
    rank = dist.get_rank() if dist.is_initialized() else 0
    problems = []
    for it in candidates:
        try:
            meta, extra = load_checkpoint(it, model_chunks, optimizer, allow_unverified=allow_unverified,
                                          reset_optimizer=reset_optimizer)
        except CheckpointCorrupt as e:
            problems.append(f"checkpoint {it.name}: {e}")
        else:
            if problems and rank == 0:
                log.warning("checkpoint: %s; resuming from the newest intact checkpoint, %s (step %s)",
                            problems[-1], it.name, meta["step"])
            return meta, extra
        if rank == 0:
            log.warning("checkpoint: %s", problems[-1])
    raise CheckpointCorrupt(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(problems)
                            + "; move the damaged folders away (or set checkpoint.resume=false) to start afresh")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def clean_stale_tmp(ckpt_dir: str | Path) -> list[Path]:
    """Removes temporary folders/files left by saves that never finished (a killed run or a full disk).

    Call it only while holding the out_dir lock: a live trainer's save in progress looks the same.
    """
    d = Path(ckpt_dir)
    removed = []
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        if TMP_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("checkpoint: removed %d unfinished save(s) left by an earlier run: %s",
                 len(removed), ", ".join(p.name for p in removed))
    return removed


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _has_state(optimizer) -> bool:
    return any(bool(sub.optimizer.state) for sub in getattr(optimizer, "chained_optimizers", [optimizer]))


def _model_sharded_state_dict(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return unwrap(model_chunks[0]).sharded_state_dict()
    sd = {}
    for i, m in enumerate(model_chunks):
        sd[f"model{i}"] = unwrap(m).sharded_state_dict()
    return sd


def load_model_weights(path: str | Path, model_chunks: list, verify: bool = True,
                       allow_unverified: bool = False) -> dict:
    """Loads only the model weights (any TP/PP/DP layout, either layer spec) from an iteration folder or
    checkpoint dir: a checkpoint converted or trained with the local spec loads into a Transformer Engine
    model and back (models.spec_interchange). `verify` checks the CRC32s recorded at save first (a checkpoint
    without them raises UnverifiedCheckpoint unless `allow_unverified`)."""
    from megatron_apo.models.spec_interchange import load_any_spec, load_state_checked

    it = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(it, prefix="model/", allow_unverified=allow_unverified)
    sd, dropped = _dcp_load(_model_sharded_state_dict(model_chunks), it / "model", loader=load_any_spec)
    if len(model_chunks) == 1:
        load_state_checked(unwrap(model_chunks[0]), sd, dropped, str(it))
    else:
        for i, m in enumerate(model_chunks):
            load_state_checked(unwrap(m), sd[f"model{i}"], [d for d in dropped if d.startswith(f"model{i}.")], str(it))
    return read_metadata(it)


def _dcp_load(sharded: dict, folder: Path, loader=None):
    """dist_checkpointing.load (or `loader(sharded, folder)`), with a damaged file reported as CheckpointCorrupt
    naming the folder."""
    from megatron.core import dist_checkpointing

    try:
        return loader(sharded, folder) if loader is not None else dist_checkpointing.load(sharded, str(folder))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch DCP wraps a rank's read error in a CheckpointException
        if not _looks_damaged(e):
            raise
        raise CheckpointCorrupt(f"{folder} does not load ({type(e).__name__}: {_first_line(e)}); a file in it is "
                                "truncated or damaged") from e


_DAMAGE_HINTS = ("EOFError", "UnpicklingError", "truncated", "unexpected end", "invalid load key", "corrupt",
                 "is not a distributed checkpoint")  # a part folder emptied or never written


def _looks_damaged(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, EOFError) or type(e).__name__ == "UnpicklingError":
            return True
        if any(h.lower() in f"{type(e).__name__}: {e}".lower() for h in _DAMAGE_HINTS):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _rank_failure(e: BaseException) -> BaseException:
    """The first rank's own exception inside torch DCP's CheckpointException ({rank: (exception, traceback)})."""
    for failure in (getattr(e, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return e


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


def load_checkpoint(path: str | Path, model_chunks: list, optimizer=None, verify: bool = True,
                    allow_unverified: bool = False, reset_optimizer: bool = False) -> tuple[dict, Any]:
    """Restores model, optimizer and (same world size only) RNG states. Returns (metadata, extra).

    With `verify`, every file is first checked against the checksums recorded at save (CheckpointCorrupt), before
    any reader opens one; a checkpoint without checksums raises UnverifiedCheckpoint unless `allow_unverified`.
    An optimizer state saved at another TP/PP size in a format that cannot be resharded raises
    OptimizerLayoutChanged, or with `reset_optimizer` is skipped with a warning (fresh Adam state).
    """
    it = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(it, allow_unverified=allow_unverified)
    meta = load_model_weights(it, model_chunks, verify=False)
    if optimizer is not None and (it / "optim" / "metadata.json").is_file() and _optimizer_loadable(meta, it,
                                                                                                   reset_optimizer):
        _load_optimizer(it, meta, model_chunks, optimizer, reset_optimizer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = it / "rng" / f"rank_{rank:05d}.pt"
    if meta.get("world_size") == world and rng_file.is_file():
        state = _load_plain(rng_file)
        if state is not None:
            _set_rng_state(state)
    extra = None
    if (it / EXTRA_FILE).is_file():
        extra = json.loads((it / EXTRA_FILE).read_text())
    elif (it / _LEGACY_EXTRA).is_file():
        extra = _load_plain(it / _LEGACY_EXTRA)
    return meta, extra


def _load_plain(f: Path):
    """torch.load with weights_only=True; an older version's RNG file (numpy arrays inside) is skipped, saying so."""
    try:
        return torch.load(f, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError: a type outside torch's allow-list
        if rank_zero():
            log.warning("checkpoint: %s not loaded: it holds more than tensors and numbers (%s)", f, _first_line(e))
        return None


def rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _optimizer_loadable(meta: dict, it: Path, reset_optimizer: bool) -> bool:
    """False when the optimizer state was saved at another TP/PP in a format that cannot be resharded, and the
    user allowed a reset (else OptimizerLayoutChanged)."""
    saved = meta.get("parallel")
    now = _parallel_layout()
    if saved is None or saved == now or meta.get("optim_sharding") in _RESHARDABLE:
        return True
    change = ", ".join(f"{k.split('_')[0]} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
    if reset_optimizer:
        if rank_zero():
            log.warning("checkpoint: %s was saved at another layout (%s); its optimizer state cannot be resharded "
                        "to it, so Adam starts afresh (checkpoint.reset_optimizer=true)", it.name, change)
        return False
    raise OptimizerLayoutChanged(
        f"{it}: the optimizer state was saved at another parallel layout ({change}) in the {meta.get('optim_sharding')}"
        " format, which loads at any data-parallel size only; resume at the saved TP/PP, or set "
        "checkpoint.reset_optimizer=true to keep the weights and start Adam afresh")


def _load_optimizer(it: Path, meta: dict, model_chunks: list, optimizer, reset_optimizer: bool) -> None:
    # A fresh Adam has no per-param state (no "step") yet; megatron needs it allocated before a load.
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values") and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()
    sharding = meta.get("optim_sharding") or OPTIM_SHARDING
    optim_sd = optimizer.sharded_state_dict(_model_sharded_state_dict(model_chunks), is_loading=True,
                                            metadata={"distrib_optim_sharding_type": sharding})
    try:
        loaded = _dcp_load({"optimizer": optim_sd}, it / "optim")
    except (KeyError, CheckpointingException, CheckpointException) as e:  # an older checkpoint of another TP/PP
        if meta.get("parallel") == _parallel_layout():
            raise  # same layout: not a layout problem
        root = _rank_failure(e)
        why = f"{type(root).__name__}: {_first_line(root)}"
        if reset_optimizer:
            for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
                sub.optimizer.state.clear()  # the dummy states: Adam allocates fresh ones at its first step
            if rank_zero():
                log.warning("checkpoint: %s: the optimizer state does not fit this parallel layout (%s); Adam starts "
                            "afresh (checkpoint.reset_optimizer=true)", it.name, why)
            return
        raise OptimizerLayoutChanged(
            f"{it}: the optimizer state does not fit this parallel layout ({why}); resume at the TP/PP it was saved "
            "with, or set checkpoint.reset_optimizer=true to start Adam afresh") from None
    with torch.no_grad():  # fp32 params: the main params are views of the (grad-requiring) model params
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
