"""Checkpoint conversion Hugging Face <-> Megatron (any TP/PP, and EP for MoE models), used by
`megatron-apo convert` and `tools/convert_checkpoint.py`.

* hf-to-megatron: TP*PP*EP local processes (gloo on CPU); each builds its model shard (its experts only, at EP>1),
  fills it tensor by tensor
  from the (memory-mapped) safetensors through `hf_mapping.hf_to_megatron`, and the ranks write one
  `dist_checkpointing` checkpoint together. Peak memory per rank: its shard plus one full tensor.
* megatron-to-hf: one process, no process group; reads one layer at a time from the torch_dist storage
  (`DistCheckpointReader`), maps it with `hf_mapping.megatron_to_hf` and streams it into pre-planned
  safetensors shards. Peak memory: about one layer (or the embedding, whichever is larger).

Both write into a hidden temporary folder next to the output and rename it at the end, so a failure
leaves no output folder behind. Every input problem found before any work starts is a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_apo.config import InputError, MissingInputError, UserError
from megatron_apo.diskio import DiskError, describe_os_error
from megatron_apo.models.checksums import CHECKSUM_FILE, add_to_manifest, verify_checkpoint
from megatron_apo.models.config import ModelConfig
from megatron_apo.models.hf_mapping import (
    OUTPUT_LAYER,
    VOCAB_PADDED,
    hf_config_from_model_config,
    hf_shapes,
    hf_sources,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_hf_config,
)
from megatron_apo.models.megatron_checkpoint import (
    MODEL_SUBDIR,
    DistCheckpointReader,
    load_megatron_model,  # noqa: F401  (re-exported: load a converted checkpoint at any TP/PP)
    read_checkpoint_metadata,
    resolve_checkpoint,
    save_model,
    write_checkpoint_metadata,
)
from megatron_apo.models.safetensors_io import (
    HFCheckpoint,
    ShardedSafetensorsWriter,
    copy_tokenizer_files,
    parse_dtype,
    parse_size,
)

TOKENIZER_SUBDIR = "tokenizer"  # hf-to-megatron keeps the source tokenizer here for the way back


@dataclass
class ConversionReport:
    out: str
    direction: str
    dtype: str
    num_tensors: int = 0
    total_bytes: int = 0
    seconds: float = 0.0
    max_abs_delta: float | None = None  # set when the conversion downcast (e.g. fp32 -> bf16)
    peak_rss_bytes: list[int] = field(default_factory=list)  # per process (max RSS as the OS counts it)
    start_rss_bytes: list[int] = field(default_factory=list)  # per process, when the conversion work began
    shard_bytes: list[int] = field(default_factory=list)  # hf-to-megatron: each rank's model shard

    def summary(self) -> str:
        s = (f"convert {self.direction}: wrote {self.out} ({self.num_tensors} tensors, "
             f"{self.total_bytes / 1e9:.3f} GB, {self.dtype}) in {self.seconds:.1f}s")
        if self.max_abs_delta is not None:
            s += f"; downcast max |delta| = {self.max_abs_delta:.3e}"
        return s


def reset_peak_rss() -> None:
    """Restarts the kernel's peak-RSS counter (Linux). Reason: a spawned process's ru_maxrss starts at its
    parent's RSS at fork time, which would hide the conversion's own peak."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss (VmHWM), else since the process started."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def _disk_errors_one_line(out: str | Path):
    """An OSError while writing `out` (a full disk, a quota) becomes DiskError: one line naming `out`, the cause,
    and that nothing was left behind (atomic_output_dir removed its temporary folder)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, UserError):
            raise
        raise DiskError(e.errno or 0, describe_os_error(e, out, f"export not written ({Path(out).name} not "
                                                                "created): writing")) from None


@contextlib.contextmanager
def atomic_output_dir(out: str | Path):
    """Yields a temporary sibling folder; renames it to `out` on success, deletes it on failure."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output {out} already exists and is not empty; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)


class _Progress:
    """A rich progress bar on stderr (or nothing), advanced by bytes converted."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=False)
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        if self._bar:
            self._bar.advance(self._task, n)


def _cast(t: torch.Tensor, dtype: torch.dtype, deltas: list[float]) -> torch.Tensor:
    """Casts to `dtype`, recording max |delta| when the cast can lose precision."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if torch.finfo(dtype).bits < torch.finfo(t.dtype).bits or {t.dtype, dtype} == {torch.float16, torch.bfloat16}:
        deltas.append((out.float() - t.float()).abs().max().item() if t.numel() else 0.0)
    return out


# ------------------------------------------------------------------------------- HF -> Megatron

def inspect_hf(hf_dir: str | Path, tp: int = 1, pp: int = 1, ep: int = 1) -> tuple[HFCheckpoint, ModelConfig]:
    """Opens and validates an HF folder for a TP/PP/EP target (before any process starts)."""
    hf = HFCheckpoint(hf_dir)
    source = str(Path(hf_dir) / "config.json")
    cfg = model_config_from_hf_config(hf.config, name=Path(hf_dir).name, source=source)
    if tp < 1 or pp < 1 or ep < 1:
        raise InputError(f"--tp, --pp and --ep must be >= 1 (got tp={tp}, pp={pp}, ep={ep})")
    cfg.validate(tp, pp, source=source)
    check_expert_parallel(cfg, tp, ep, source)
    hf.validate(hf_shapes(cfg))
    return hf, cfg


def check_expert_parallel(cfg: ModelConfig, tp: int, ep: int, source: str) -> None:
    """EP splits whole experts over ranks; each expert is then TP-split (expert TP = TP)."""
    if not cfg.is_moe:
        if ep > 1:
            raise InputError(f"{source}: --ep {ep} needs a mixture-of-experts model; {cfg.name} is dense "
                             f"({cfg.architecture}); use --ep 1")
        return
    if cfg.num_moe_experts % ep:
        raise InputError(f"{source}: --ep {ep} does not divide num_experts={cfg.num_moe_experts}; pick an EP that "
                         "divides it")
    moe_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    if moe_ffn % tp:
        raise InputError(f"{source}: --tp {tp} does not divide moe_intermediate_size={moe_ffn}; pick a TP that "
                         "divides it")


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1,
                           dtype: str | torch.dtype | None = None, progress: bool = True,
                           timeout: float = 24 * 3600, ep: int = 1) -> ConversionReport:
    """HF folder -> Megatron checkpoint folder (`model/` dist checkpoint + megatron_apo.json) for TP x PP x EP.

    Spawns TP*PP*EP local host-only processes (gloo, GPUs hidden: any layout on any node); inside an already
    initialised job call `save_hf_as_megatron`. EP > 1 (MoE models only): each process holds
    num_experts / EP experts, so each process reads only its experts' HF tensors.
    """
    from megatron_apo.parallel import run_distributed

    start = time.time()
    hf, _ = inspect_hf(hf_dir, tp, pp, ep)
    target = parse_dtype(dtype) or hf.dtype()
    with atomic_output_dir(out) as tmp:
        results = run_distributed(_hf_to_megatron_rank, tp * pp * ep, str(hf_dir), str(tmp), tp, pp, str(target),
                                  progress, ep, timeout=timeout, host_only=True)  # never GPUs (docs/gpu.md)
        with contextlib.suppress(FileNotFoundError):
            (tmp / TOKENIZER_SUBDIR).mkdir()
            copy_tokenizer_files(hf_dir, tmp / TOKENIZER_SUBDIR)
        if not any((tmp / TOKENIZER_SUBDIR).iterdir()):
            (tmp / TOKENIZER_SUBDIR).rmdir()
        add_to_manifest(tmp)  # megatron_apo.json and the tokenizer files, next to model/'s CRC32s
    deltas = [r["max_abs_delta"] for r in results if r["max_abs_delta"] is not None]
    return ConversionReport(
        out=str(out), direction="hf-to-megatron", dtype=str(target).replace("torch.", ""),
        num_tensors=sum(r["num_tensors"] for r in results), total_bytes=sum(r["bytes"] for r in results),
        seconds=time.time() - start, max_abs_delta=max(deltas) if deltas else None,
        peak_rss_bytes=[r["peak_rss"] for r in results], start_rss_bytes=[r["start_rss"] for r in results],
        shard_bytes=[r["shard_bytes"] for r in results],
    )


def _hf_to_megatron_rank(hf_dir: str, tmp_out: str, tp: int, pp: int, dtype_name: str, progress: bool,
                         ep: int = 1) -> dict:
    from megatron_apo.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tp, pp, expert_model_parallel_size=ep), backend="gloo")
    return save_hf_as_megatron(hf_dir, tmp_out, dtype=dtype_name, progress=progress)


def save_hf_as_megatron(hf_dir: str | Path, out: str | Path, dtype: str | torch.dtype | None = None,
                        progress: bool = False) -> dict:
    """Collective over the current TP x PP (x EP) job: each rank builds its model shard, fills it tensor by tensor
    from the HF safetensors, and the ranks write one dist checkpoint into `<out>/model/`; rank 0 writes
    megatron_apo.json. Returns this rank's counts, downcast max |delta| and peak RSS."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_apo.models.builder import build_gpt_model
    from megatron_apo.models.sharding import is_expert_param, iter_local_params, tp_slice

    reset_peak_rss()
    start_rss = current_rss_bytes()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    hf, cfg = inspect_hf(hf_dir, tp, pp, ep)
    dtype = parse_dtype(dtype) or hf.dtype()
    model = build_gpt_model(cfg, params_dtype=dtype, perform_initialization=False)
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    # experts are TP-split over the expert-TP group, and replicated only over expert-DP
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    edp_rank = ps.get_expert_data_parallel_rank()
    padded = cfg.padded_vocab_size(tp)
    params = list(iter_local_params(model))
    deltas: list[float] = []
    nbytes, counted, counted_bytes = 0, 0, 0
    with _Progress(sum(lp.tensor.numel() * lp.tensor.element_size() for lp in params),
                   f"hf-to-megatron rank {dist.get_rank()}", progress and dist.get_rank() == 0) as bar:
        for lp in params:
            if lp.global_name in VOCAB_PADDED and lp.partition_dim == 0:
                # Read only this rank's vocabulary rows (the largest tensors), then pad.
                rows, src = lp.tensor.shape[0], hf_sources(cfg, lp.global_name)[0]
                first, last = tp_rank * rows, min((tp_rank + 1) * rows, cfg.vocab_size)
                with torch.no_grad():
                    lp.tensor[max(0, last - first):].zero_()  # padding rows
                    if hf.tensors[src].dtype == dtype:  # straight into the parameter: no second copy
                        hf.get_rows(src, first, last, out=lp.tensor.data[: max(0, last - first)])
                    else:
                        lp.tensor[: max(0, last - first)].copy_(_cast(hf.get_rows(src, first, last), dtype, deltas))
                nbytes += lp.tensor.numel() * lp.tensor.element_size()
                counted, counted_bytes = _count(counted, counted_bytes, lp, tp_rank == 0 and dp_rank == 0)
                bar.advance(lp.tensor.numel() * lp.tensor.element_size())
                continue
            expert = is_expert_param(lp.global_name)
            full = hf_to_megatron(cfg, lp.global_name, hf.get, padded_vocab_size=padded)
            shard = tp_slice(full, lp.partition_dim, etp_rank if expert else tp_rank, etp if expert else tp, lp.gated)
            with torch.no_grad():
                lp.tensor.copy_(_cast(shard, dtype, deltas))
            del full, shard
            nbytes += lp.tensor.numel() * lp.tensor.element_size()
            first_copy = (etp_rank == 0 and edp_rank == 0) if expert else (tp_rank == 0 and dp_rank == 0)
            counted, counted_bytes = _count(counted, counted_bytes, lp, first_copy)
            bar.advance(lp.tensor.numel() * lp.tensor.element_size())
    save_model(model, out)
    if dist.get_rank() == 0:
        gen = Path(hf_dir) / "generation_config.json"
        write_checkpoint_metadata(
            out, cfg, source_hf=str(Path(hf_dir).resolve()), dtype=str(dtype).replace("torch.", ""),
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
            hf_generation_config=json.loads(gen.read_text()) if gen.is_file() else None,
        )
    dist.barrier()
    # TP ranks > 0 and EP (data-parallel) ranks hold replicas: count each tensor once, by its first copy's
    # rank (a tied last stage's copy of the embedding is counted like before, on its stage).
    return {"num_tensors": counted, "bytes": counted_bytes,
            "max_abs_delta": max(deltas) if deltas else None, "peak_rss": peak_rss_bytes(), "start_rss": start_rss,
            "shard_bytes": nbytes}


def _count(n: int, nbytes: int, lp, first_copy: bool) -> tuple[int, int]:
    """Tensor and byte counts plus `lp` when this rank holds its first copy (for TP-split tensors the first TP
    rank's shard, as the report always counted)."""
    if not first_copy:
        return n, nbytes
    return n + 1, nbytes + lp.tensor.numel() * lp.tensor.element_size()


# ------------------------------------------------------------------------------- Megatron -> HF

def verify_megatron_checkpoint(ckpt: str | Path) -> str:
    """`convert --verify-only`: checks every file of a Megatron checkpoint against its checksum manifest without
    reading any of them otherwise (nothing is unpickled). Returns a one-line summary; raises CheckpointCorrupt /
    UnverifiedCheckpoint."""
    folder = resolve_checkpoint(ckpt)
    verify_checkpoint(folder, collective=False, how_to_allow="--allow-unverified (at your own risk)")
    n = len(json.loads((folder / CHECKSUM_FILE).read_text())["files"])
    return (f"convert --verify-only: {folder}: all {n} files match {CHECKSUM_FILE} (integrity only: a CRC32 is not "
            "a signature; load checkpoints from trusted sources only)")


def convert_megatron_to_hf(ckpt: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                           dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB",
                           progress: bool = True, allow_unverified: bool = False) -> ConversionReport:
    """Megatron checkpoint (any TP/PP; a checkpoint folder or a training dir of iter_*) -> HF folder.

    The checkpoint's files are checked against its checksum manifest before any is read; one without a manifest
    is refused unless `allow_unverified` (a torch_dist checkpoint is code-equivalent: trusted sources only).
    A write error (a full disk) is one line naming the output; nothing is left behind."""
    reset_peak_rss()
    start, start_rss = time.time(), current_rss_bytes()
    folder = resolve_checkpoint(ckpt)
    cfg, meta = read_checkpoint_metadata(folder)
    reader = DistCheckpointReader(folder / MODEL_SUBDIR, cfg, allow_unverified=allow_unverified)
    target = parse_dtype(dtype) or reader.dtype
    max_bytes = parse_size(max_shard_size)
    if tokenizer is None and (folder / TOKENIZER_SUBDIR).is_dir():
        tokenizer = folder / TOKENIZER_SUBDIR
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise MissingInputError(f"--tokenizer {tokenizer} does not exist")
    specs = {name: (shape, target) for name, shape in hf_shapes(cfg).items()}
    deltas: list[float] = []
    groups = reader.groups()
    total = sum(reader.tensor_bytes(n) for g in groups for n in g)
    with _disk_errors_one_line(out), atomic_output_dir(out) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, max_bytes)
        try:
            with _Progress(total, "megatron-to-hf", progress) as bar:
                for names in groups:
                    for name in [n for n in names if n in VOCAB_PADDED]:
                        # The largest tensors: stream them one stored TP shard of rows at a time.
                        if not (name == OUTPUT_LAYER and cfg.tie_word_embeddings):  # else HF has no lm_head
                            hf_name = hf_sources(cfg, name)[0]
                            for row0, row1 in reader.row_blocks(name):
                                if row0 < cfg.vocab_size:
                                    block = reader.load_rows(name, row0, min(row1, cfg.vocab_size))
                                    writer.write_rows(hf_name, row0, _cast(block, target, deltas))
                                    del block
                        bar.advance(reader.tensor_bytes(name))
                    names = [n for n in names if n not in VOCAB_PADDED]
                    loaded = reader.load(names)
                    for name in names:
                        full = loaded.pop(name)
                        for hf_name, t in megatron_to_hf(cfg, name, full):
                            writer.write(hf_name, _cast(t, target, deltas))
                        bar.advance(reader.tensor_bytes(name))
                        del full
            writer.close()
        except BaseException:
            writer.abort()
            raise
        hf_config = hf_config_from_model_config(cfg, dtype=target)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = meta.get("hf_generation_config") or {
            k: v for k, v in hf_config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp)
    return ConversionReport(
        out=str(out), direction="megatron-to-hf", dtype=str(target).replace("torch.", ""), num_tensors=len(specs),
        total_bytes=writer.total_size, seconds=time.time() - start, max_abs_delta=max(deltas) if deltas else None,
        peak_rss_bytes=[peak_rss_bytes()], start_rss_bytes=[start_rss],
    )
