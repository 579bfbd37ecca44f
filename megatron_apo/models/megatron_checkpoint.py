"""The Megatron checkpoint layout megatron-apo writes and reads, and tensor-by-tensor reading of it.

This module owns the layout's names; `trainer/checkpoint.py` (training saves) and `models/convert.py` use them.
A checkpoint is a folder holding
  * `model/`            a `megatron.core.dist_checkpointing` checkpoint (torch_dist) of `model.sharded_state_dict()`,
                        so one written at some TP/PP loads at any other;
  * `megatron_apo.json` `{"model_config": ModelConfig.to_dict(), ...}` plus what conversion knows (source, dtype);
  * `checksums.json`    the CRC32 of every other file (`models/checksums.py`), verified before any file is read.
Training checkpoints are `<ckpt_dir>/iter_<step, 7 digits or more>/` folders of that layout, and `<ckpt_dir>/latest`
(and `latest_checkpointed_iteration.txt`, Megatron-LM's name) holds the newest step; `resolve_checkpoint` picks one.

`DistCheckpointReader` reads single layers' tensors straight from the torch_dist storage with
`torch.distributed.checkpoint` (no process group, no model), so exporting needs memory for one layer only.

A torch_dist folder is code-equivalent: torch's reader unpickles `.metadata` and the non-tensor objects in the
`.distcp` files, and megatron-core `torch.load`s `common.pt`. Every
reader here verifies the checksum manifest first, so a file changed after the save is refused before it is opened;
a checkpoint must still come from someone you trust (docs/reliability.md, "Security").
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from megatron_apo.config import InputError, MissingInputError
from megatron_apo.models.checksums import CHECKSUM_FILE, checksum_files, verify_checkpoint
from megatron_apo.models.config import ModelConfig
from megatron_apo.models.hf_mapping import (
    EMBEDDING,
    EXPERT_STACKED,
    FINAL_NORM,
    OUTPUT_LAYER,
    expert_index,
    layer_index,
    megatron_param_names,
    megatron_shape,
    stacked_name,
)
from megatron_apo.models.spec_interchange import local_spelling

METADATA_FILE = "megatron_apo.json"
MODEL_SUBDIR = "model"
# `latest_checkpointed_iteration.txt` is the name Megatron-LM's own tools look for; `latest` is ours
LATEST_FILES = ("latest", "latest_checkpointed_iteration.txt")
ITER_RE = re.compile(r"^iter_(\d+)$")  # iter_0000012; 8 digits from step 10,000,000 on
TMP_RE = re.compile(r"^(iter_\d+|\.latest|\.latest_checkpointed_iteration\.txt)\.tmp-\d+$")  # unfinished saves


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def iter_step(folder: str | Path) -> int | None:
    """The step of an `iter_*` folder name, or None for any other name."""
    m = ITER_RE.match(Path(folder).name)
    return int(m.group(1)) if m else None


def list_iterations(ckpt_dir: str | Path) -> list[Path]:
    """The complete `iter_*` checkpoints of a training dir, oldest first (unfinished saves are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and iter_step(p) is not None and is_checkpoint(p)]
    return sorted(found, key=iter_step)


def read_latest(ckpt_dir: str | Path) -> tuple[Path, str] | None:
    """(the `latest` file found, its first line) for a training dir, or None when it has neither file."""
    for name in LATEST_FILES:
        f = Path(ckpt_dir) / name
        if f.is_file():
            text = f.read_text().strip()
            return f, text.splitlines()[0].strip() if text else ""
    return None


def write_latest(ckpt_dir: str | Path, step: int) -> None:
    """Points both `latest` files at `step`, each replaced atomically."""
    import os

    for name in LATEST_FILES:
        tmp = Path(ckpt_dir) / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(f"{step}\n")
        os.replace(tmp, Path(ckpt_dir) / name)


def is_checkpoint(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file() and (folder / MODEL_SUBDIR).is_dir()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a training dir of `iter_*` checkpoints (its `latest` file, else the highest)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"Megatron checkpoint {path} does not exist")
    if is_checkpoint(path):
        return path
    latest = read_latest(path)
    if latest is not None:
        f, text = latest
        cand = path / text if text.startswith("iter_") else path / iter_dir_name(int(text)) if text.isdigit() else None
        if cand is None or not is_checkpoint(cand):
            raise MissingInputError(f"{f} points to {text!r}, which is not a checkpoint folder with "
                                    f"{MODEL_SUBDIR}/ and {METADATA_FILE}")
        return cand
    iters = list_iterations(path)
    if iters:
        return iters[-1]
    if (path / MODEL_SUBDIR).is_dir() and not (path / METADATA_FILE).is_file():
        raise MissingInputError(f"{path / METADATA_FILE} is missing; it must hold {{\"model_config\": ...}}")
    raise MissingInputError(f"{path} is not a Megatron checkpoint: expected {MODEL_SUBDIR}/ + {METADATA_FILE}, "
                            f"or iter_* folders of that layout")


def read_checkpoint_metadata(folder: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(folder) / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if "model_config" not in meta:
        raise InputError(f"{path}: missing key 'model_config'")
    return ModelConfig.from_dict(meta["model_config"], source=f"{path} model_config"), meta


def write_checkpoint_metadata(folder: str | Path, cfg: ModelConfig, **extra) -> None:
    meta = {"model_config": cfg.to_dict(), **extra}
    (Path(folder) / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def save_model(model, folder: str | Path) -> None:
    """Collective over all ranks: writes this rank's part of the model into `<folder>/model/`."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_apo.models.sharding import unwrap

    target = Path(folder) / MODEL_SUBDIR
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(target))
    # CRC32s of model/'s files (collective), verified whenever this checkpoint is loaded or converted
    sums = {f"{MODEL_SUBDIR}/{k}": v for k, v in checksum_files(target).items()}
    if dist.get_rank() == 0:
        (Path(folder) / CHECKSUM_FILE).write_text(json.dumps({"algorithm": "crc32", "files": sums}, indent=1) + "\n")
    dist.barrier()


def load_megatron_model(folder: str | Path, params_dtype: torch.dtype | None = None,
                        transformer_impl: str | None = None, allow_unverified: bool = False):
    """Builds the model for the current TP/PP layout and loads a checkpoint written at any TP/PP and either spec.

    Returns (model, ModelConfig). Collective over all ranks (Megatron parallel state must be initialised).
    `allow_unverified`: load a checkpoint that has no checksum manifest (only one from a trusted source).
    """
    from megatron.core import parallel_state as ps

    from megatron_apo.models.builder import build_gpt_model
    from megatron_apo.models.spec_interchange import load_any_spec

    ckpt = resolve_checkpoint(folder)
    cfg, _ = read_checkpoint_metadata(ckpt)
    reader = DistCheckpointReader(ckpt / MODEL_SUBDIR, cfg, allow_unverified=allow_unverified)
    model = build_gpt_model(cfg, params_dtype=params_dtype or reader.dtype, perform_initialization=False,
                            transformer_impl=transformer_impl)
    sharded = model.sharded_state_dict()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    repad = reader.vocab_rows != cfg.padded_vocab_size(tp)
    if repad:
        # Vocab padding depends on TP: read the vocabulary tensors whole and re-pad them for this layout.
        for key in [k for k in sharded if k.endswith((EMBEDDING, OUTPUT_LAYER))]:
            del sharded[key]
    state, _ = load_any_spec(sharded, ckpt / MODEL_SUBDIR)  # written by either layer spec
    model.load_state_dict(state, strict=False)
    if repad:
        from megatron_apo.models.hf_mapping import pad_vocab
        from megatron_apo.models.sharding import iter_local_params, tp_slice

        for lp in iter_local_params(model):
            if lp.global_name in (EMBEDDING, OUTPUT_LAYER):
                src = EMBEDDING if lp.global_name == OUTPUT_LAYER and cfg.tie_word_embeddings else lp.global_name
                full = pad_vocab(reader.load([src])[src][: cfg.vocab_size], cfg.padded_vocab_size(tp))
                with torch.no_grad():
                    lp.tensor.copy_(tp_slice(full, lp.partition_dim, tp_rank, tp))
    return model, cfg


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.shape[dim]:
            t = t.narrow(dim, o, n)
    return t


class DistCheckpointReader:
    """Reads full (TP=1 layout) tensors of a torch_dist checkpoint, one layer at a time, in one process.

    Megatron stores the decoder's tensors with a leading layer axis (`decoder.layers.<param>` of shape
    [num_layers, ...]); reading layer i asks the storage for the chunk at offset i on that axis only. MoE
    experts have a second, expert axis (`decoder.layers.mlp.experts.experts.<w>` of shape
    [num_layers, num_experts, ...], however many EP ranks wrote it); expert e of layer i is the chunk at (i, e).
    """

    def __init__(self, folder: str | Path, cfg: ModelConfig, allow_unverified: bool = False):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = Path(folder)
        self.cfg = cfg
        if not (self.folder / ".metadata").is_file():
            raise MissingInputError(f"{self.folder} is not a torch_dist checkpoint (no .metadata file)")
        # before torch's reader unpickles .metadata: a file changed since the save never gets opened
        verify_checkpoint(self.folder.parent, prefix=f"{self.folder.name}/", collective=False,
                          allow_unverified=allow_unverified, how_to_allow="--allow-unverified")
        self._reader = dcp.FileSystemReader(str(self.folder))
        try:
            md = self._reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - a truncated pickle raises EOFError/UnpicklingError
            raise InputError(f"{self.folder / '.metadata'} is damaged or truncated ({type(e).__name__}: "
                             f"{str(e).strip()[:200]})") from None
        tensors = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        emb = [k for k in tensors if k.endswith(EMBEDDING)]
        if not emb:
            raise InputError(f"{self.folder}: no {EMBEDDING} tensor; not a GPTModel checkpoint")
        self.prefix = emb[0][: -len(EMBEDDING)]  # e.g. "" or a wrapper prefix
        # names in the local spec's spelling; `_stored` maps them back (a Transformer Engine checkpoint
        # spells the norms linear_qkv.layer_norm_weight / linear_fc1.layer_norm_weight)
        self._stored = {local_spelling(k[len(self.prefix):]): k for k in tensors if k.startswith(self.prefix)}
        self.meta = {name: tensors[k] for name, k in self._stored.items()}
        self.layer_suffixes = sorted(k[len("decoder.layers."):] for k in self.meta if k.startswith("decoder.layers."))
        self.dtype = self.meta[EMBEDDING].properties.dtype
        self.vocab_rows = self.meta[EMBEDDING].size[0]
        self._validate()

    def _validate(self) -> None:
        cfg, where = self.cfg, f"{self.folder}"
        if self.vocab_rows < cfg.vocab_size:
            raise InputError(f"{where}: {EMBEDDING} has {self.vocab_rows} rows < vocab_size={cfg.vocab_size} in "
                             f"{METADATA_FILE} (config and weights do not match)")
        expected = [FINAL_NORM] + ([] if cfg.tie_word_embeddings else [OUTPUT_LAYER])
        for name in expected:
            if name not in self.meta:
                raise InputError(f"{where}: tensor {name} is missing (config and weights do not match)")
        for name in [FINAL_NORM] + [n for n in (OUTPUT_LAYER,) if n in self.meta]:
            want = megatron_shape(cfg, name)
            got = tuple(self.meta[name].size)
            if (got[1:] != want[1:] or (name != FINAL_NORM and got[0] != self.vocab_rows)
                    or (name == FINAL_NORM and got != want)):
                raise InputError(f"{where}: tensor {name} has shape {list(got)}, the config implies {list(want)}")
        sample = {stacked_name(n)[len("decoder.layers."):]: n for n in megatron_param_names(cfg)
                  if layer_index(n) == 0 and expert_index(n) in (None, 0)}
        missing = {s for s in sample if not s.endswith("norm.weight")} - set(self.layer_suffixes)
        if missing:
            raise InputError(f"{where}: decoder tensors {sorted(missing)} are missing "
                             f"(config and weights do not match)")
        for suffix in self.layer_suffixes:
            size = tuple(self.meta["decoder.layers." + suffix].size)
            if suffix not in sample:
                raise InputError(f"{where}: decoder.layers.{suffix} is not a tensor of {cfg.name} "
                                 f"({cfg.architecture}{', MoE' if cfg.is_moe else ''}; config and weights do not "
                                 f"match)")
            experts = (cfg.num_moe_experts,) if expert_index(sample[suffix]) is not None else ()
            want = (cfg.num_layers, *experts) + megatron_shape(cfg, sample[suffix])
            if size != want:
                raise InputError(f"{where}: decoder.layers.{suffix} has shape {list(size)}, the config implies "
                                 f"{list(want)} (num_layers first; config and weights do not match)")

    def tensor_bytes(self, global_name: str) -> int:
        key = stacked_name(global_name)
        md = self.meta[key]
        n = 1
        for s in md.size[self._stacked_axes(global_name):]:
            n *= s
        return n * torch.empty((), dtype=md.properties.dtype).element_size()

    @staticmethod
    def _stacked_axes(global_name: str) -> int:
        """Leading storage axes a name indexes: 0 (embedding...), 1 (layer), 2 (layer, expert)."""
        return 0 if layer_index(global_name) is None else 1 if expert_index(global_name) is None else 2

    def groups(self) -> list[list[str]]:
        """Global names in reading order, grouped: [embedding], each layer (all its experts), [final norm, output
        layer]."""
        out = [[EMBEDDING]]
        prefix = EXPERT_STACKED[len("decoder.layers."):]
        for i in range(self.cfg.num_layers):
            names = []
            for s in self.layer_suffixes:
                if s.startswith(prefix):
                    w = s[len(prefix):]
                    names += [f"decoder.layers.{i}.mlp.experts.local_experts.{e}.{w}"
                              for e in range(self.cfg.num_moe_experts)]
                else:
                    names.append(f"decoder.layers.{i}.{s}")
            out.append(names)
        out.append([FINAL_NORM] + ([OUTPUT_LAYER] if OUTPUT_LAYER in self.meta else []))
        return out

    def row_blocks(self, global_name: str) -> list[tuple[int, int]]:
        """The row ranges [start, stop) in which a non-layer tensor is stored (one per TP shard)."""
        md = self.meta[global_name]
        starts = sorted({c.offsets[0] for c in md.chunks} | {md.size[0]})
        return list(zip(starts[:-1], starts[1:]))

    def load_rows(self, global_name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a non-layer tensor (e.g. one stored TP shard of the embedding)."""
        md = self.meta[global_name]
        key = self._stored[global_name]
        state = {key: torch.empty((stop - start, *md.size[1:]), dtype=md.properties.dtype)}
        self._dcp_load(state, {key: (start,) + (0,) * (len(md.size) - 1)}, [global_name])
        return state[key]

    def _dcp_load(self, state, offsets, names) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            with warnings.catch_warnings():  # one process on purpose (no_dist): torch's warning says only that
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=self._reader, planner=_SlicePlanner(offsets), no_dist=True)
        except CheckpointException as e:  # a BaseException in torch: turn it into a one-line input error
            cause = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1].strip()
            raise InputError(f"{self.folder}: cannot read {names[0]}"
                             f"{' and others' if len(names) > 1 else ''} (storage damaged? {cause})") from None

    def load(self, global_names: list[str]) -> dict[str, torch.Tensor]:
        """Reads the named full tensors (a layer's names read only that layer's slice of the storage)."""
        # one request per storage key: a layer's experts are one contiguous [1, num_experts, ...] chunk
        state, offsets, wanted = {}, {}, {}
        for name in global_names:
            stacked, axes = stacked_name(name), self._stacked_axes(name)
            key, md = self._stored[stacked], self.meta[stacked]
            if key in state and axes and offsets[key][0] != layer_index(name):
                raise ValueError(f"DistCheckpointReader.load: {name} is in another layer than the names before it; "
                                 "read one layer per call")
            if key not in state:
                lead = (1,) if axes else ()
                state[key] = torch.empty((*lead, *md.size[len(lead):]), dtype=md.properties.dtype)
                offsets[key] = ((layer_index(name),) if axes else ()) + (0,) * (len(md.size) - len(lead))
            wanted[name] = key
        self._dcp_load(state, offsets, global_names)
        out = {}
        for name, key in wanted.items():
            t = state[key]
            axes = self._stacked_axes(name)
            out[name] = t if axes == 0 else t[0] if axes == 1 else t[0, expert_index(name)]
        return out


def _slice_planner_cls():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Loads each requested tensor as the chunk of the stored global tensor at a given offset."""

        def __init__(self, offsets: dict[str, tuple[int, ...]]):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.offsets = offsets

        def create_local_plan(self):
            requests = []
            for fqn, t in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[fqn]), sizes=t.size())
                requests += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(requests)

        def resolve_tensor(self, read_item):
            return _narrow(self.state_dict[read_item.dest_index.fqn], read_item.dest_offsets, read_item.lengths)

    return SlicePlanner


def _SlicePlanner(offsets):
    return _slice_planner_cls()(offsets)
