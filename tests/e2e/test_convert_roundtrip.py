"""HF -> Megatron (TP=2, PP=2) -> HF: every tensor bit-exact, the exported folder loads with
AutoModelForCausalLM and greedy-generates the original's tokens; the CLI spellings; training-checkpoint
folders (iter_*, latest); bad input is a one-line error that leaves no output folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_apo.models.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_apo.models.megatron_checkpoint import resolve_checkpoint
from tests.helpers.hf_models import build_hf_model, sample_tokens, save_hf_model, save_tiny_tokenizer

CLI = [sys.executable, "-m", "megatron_apo.cli", "convert"]


def _hf_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.tmp-*"))


@pytest.fixture(scope="module")
def qwen_tied_round_trip(tmp_path_factory):
    """Qwen2 with tied embeddings through the CLI: hf-to-megatron --tp 2 --pp 2, megatron-to-hf --tokenizer."""
    root = tmp_path_factory.mktemp("rt")
    model = build_hf_model("qwen2-tied", seed=3)
    model.generation_config.update(do_sample=False, max_new_tokens=12, eos_token_id=None)
    model.save_pretrained(root / "hf", max_shard_size="40KB")  # sharded input with an index
    tok_dir = root / "tok"
    save_tiny_tokenizer(tok_dir, model.config.vocab_size)
    r = subprocess.run(CLI + ["hf-to-megatron", "--hf", str(root / "hf"), "--out", str(root / "meg"),
                              "--tp", "2", "--pp", "2", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hf-to-megatron" in r.stdout
    r = subprocess.run(CLI + ["megatron-to-hf", "--megatron", str(root / "meg"), "--out", str(root / "back"),
                              "--tokenizer", str(tok_dir), "--max-shard-size", "50KB", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, model


@pytest.mark.slow
def test_round_trip_tp2_pp2_is_bit_exact_and_generates_the_same_tokens(qwen_tied_round_trip):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    root, original = qwen_tied_round_trip
    meta = json.loads((root / "meg" / "megatron_apo.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2 and meta["pipeline_model_parallel_size"] == 2
    a, b = _hf_tensors(root / "hf"), _hf_tensors(root / "back")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    index = json.loads((root / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert sorted(index["weight_map"]) == sorted(a)
    cfg = json.loads((root / "back" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 250
    gen = json.loads((root / "back" / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 12  # the source's generation_config travelled through megatron_apo.json

    exported = AutoModelForCausalLM.from_pretrained(root / "back", dtype=torch.float32, attn_implementation="eager")
    prompt = sample_tokens(250, n=2, s=6)
    kw = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    with torch.no_grad():
        want = original.generate(prompt, **kw)
        got = exported.eval().generate(prompt, **kw)
    assert want.shape[1] == 18 and torch.equal(want, got)
    for f in (root / "tok").iterdir():  # tokenizer files copied unchanged, and they load
        assert (root / "back" / f.name).read_bytes() == f.read_bytes()
    tok = PreTrainedTokenizerFast.from_pretrained(root / "back")
    assert tok("w5 w7")["input_ids"] == [5, 7]


@pytest.mark.slow
def test_training_checkpoint_dirs_resolve_to_latest(qwen_tied_round_trip, tmp_path):
    root, _ = qwen_tied_round_trip
    train = tmp_path / "ckpts"
    for it in (5, 20, 100):
        shutil.copytree(root / "meg", train / f"iter_{it:07d}", symlinks=True)
    (train / "iter_0000200").mkdir()  # an unfinished save (no metadata) is not a checkpoint
    assert resolve_checkpoint(train) == train / "iter_0000100"
    (train / "latest_checkpointed_iteration.txt").write_text("20\n")
    assert resolve_checkpoint(train) == train / "iter_0000020"
    (train / "latest").write_text("iter_0000005")
    assert resolve_checkpoint(train) == train / "iter_0000005"
    convert_megatron_to_hf(train, tmp_path / "out", progress=False)
    a, b = _hf_tensors(root / "hf"), _hf_tensors(tmp_path / "out")
    assert all(torch.equal(a[n], b[n]) for n in a)
    (train / "latest").write_text("iter_0000200")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_checkpoint(train)


def _cli_error(args, tmp_path, out_name="out"):
    r = subprocess.run(CLI + args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert _no_leftovers(tmp_path, out_name)
    return lines[0]


def test_bad_input_is_one_line_error_and_no_output(tmp_path):
    hf = save_hf_model("qwen2", tmp_path / "hf", max_shard_size="40KB")
    shards = sorted(hf.glob("*.safetensors"))
    assert len(shards) > 1
    args = ["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "out")]

    out = tmp_path / "out"
    # the library raises one-line ValueError/FileNotFoundError before any process starts...
    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide num_query_groups=2"):
        convert_hf_to_megatron(hf, out, tp=4, progress=False)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, architectures=["MistralForCausalLM"])))
    with pytest.raises(ValueError, match=r"architectures=\['MistralForCausalLM'\] is not supported"):
        convert_hf_to_megatron(hf, out, progress=False)
    (hf / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    with pytest.raises(ValueError,
                       match=r"mlp.gate_proj.weight has shape \[128, 64\] but config.json implies \[96, 64\]"):
        convert_hf_to_megatron(hf, out, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_megatron_to_hf(tmp_path / "nowhere", out, progress=False)
    assert _no_leftovers(tmp_path, "out")
    # ...and the CLI prints them as one line (exit code 2)
    assert "does not divide num_query_groups" in _cli_error(args + ["--tp", "4"], tmp_path)
    (hf / "config.json").write_text(json.dumps(cfg))
    shards[1].unlink()
    msg = _cli_error(args + ["--tp", "2"], tmp_path)
    assert shards[1].name in msg and "missing" in msg


def test_a_converted_checkpoint_verifies_whole(qwen_tied_round_trip, tmp_path):
    """hf-to-megatron records every file it writes (model/, megatron_apo.json) in checksums.json."""
    from megatron_apo.models.convert import verify_megatron_checkpoint

    meg = qwen_tied_round_trip[0] / "meg"
    listed = json.loads((meg / "checksums.json").read_text())["files"]
    assert "megatron_apo.json" in listed and any(n.startswith("model/") for n in listed)
    assert f"all {len(listed)} files match" in verify_megatron_checkpoint(meg)
    ckpt = shutil.copytree(meg, tmp_path / "meg")
    meta = json.loads((ckpt / "megatron_apo.json").read_text())
    (ckpt / "megatron_apo.json").write_text(json.dumps(dict(meta, dtype="float16")))
    with pytest.raises(ValueError, match="megatron_apo.json is damaged"):
        verify_megatron_checkpoint(ckpt)


def test_megatron_to_hf_errors_leave_no_output(qwen_tied_round_trip, tmp_path):
    root, _ = qwen_tied_round_trip
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "meg", ckpt)
    meta = json.loads((ckpt / "megatron_apo.json").read_text())
    # config/weights mismatch: the metadata claims another ffn size than the stored tensors have
    meta["model_config"]["ffn_hidden_size"] = 96
    (ckpt / "megatron_apo.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config and weights do not match"):
        convert_megatron_to_hf(ckpt, tmp_path / "out", progress=False)
    assert _no_leftovers(tmp_path, "out")
    # a storage file broken mid-way: the failure happens while writing, and still nothing is left behind
    shutil.rmtree(ckpt)
    shutil.copytree(root / "meg", ckpt)
    for f in (ckpt / "model").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="distcp is damaged .its CRC32 differs"):  # the checksums catch it upfront
        convert_megatron_to_hf(ckpt, tmp_path / "out", progress=False)
    assert _no_leftovers(tmp_path, "out")
    (ckpt / "checksums.json").unlink()  # a checkpoint without checksums: the failure comes while writing
    with pytest.raises(ValueError, match="cannot read embedding.word_embeddings.weight"):
        convert_megatron_to_hf(ckpt, tmp_path / "out", progress=False, allow_unverified=True)
    assert _no_leftovers(tmp_path, "out")
    # an existing non-empty output is never overwritten
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(ValueError, match="already exists"):
        convert_megatron_to_hf(root / "meg", tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "x").read_text() == "keep"


@pytest.mark.slow  # 4 conversion processes of a MoE model, then the export: about 60 s on a busy 2-core machine
def test_qwen3_moe_cli_round_trip_tp1_pp2_ep2_is_bit_exact_and_mismatches_are_caught(tmp_path):
    """Qwen3-MoE through the CLI at PP=2 x EP=2: each of the 4 ranks writes its stage's layers and its own 2 of
    the 4 experts; the export (one process, layer by layer) gives back every tensor bit-exact."""
    hf = save_hf_model("qwen3-moe", tmp_path / "hf", seed=5)
    r = subprocess.run(CLI + ["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "meg"), "--pp", "2",
                              "--ep", "2", "--quiet"], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "meg" / "megatron_apo.json").read_text())
    assert (meta["pipeline_model_parallel_size"], meta["expert_model_parallel_size"]) == (2, 2)
    r = subprocess.run(CLI + ["megatron-to-hf", "--megatron", str(tmp_path / "meg"), "--out", str(tmp_path / "back"),
                              "--quiet"], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _hf_tensors(hf), _hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b) and len(a) == 3 + 2 * (9 + 4 * 3)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_experts"] == 4 and cfg["norm_topk_prob"]
    # the metadata claims 8 experts, the storage holds 4: named, before any output is written
    meta["model_config"]["num_moe_experts"] = 8
    (tmp_path / "meg" / "megatron_apo.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="mlp.experts.experts.linear_fc1.weight has shape .2, 4, 64, 64., the config "
                                         "implies .2, 8, 64, 64."):
        convert_megatron_to_hf(tmp_path / "meg", tmp_path / "out", progress=False)
    assert _no_leftovers(tmp_path, "out")


def test_expert_parallel_layout_errors_are_one_line(tmp_path):
    moe = save_hf_model("qwen3-moe", tmp_path / "moe")
    dense = save_hf_model("qwen3", tmp_path / "dense")
    with pytest.raises(ValueError, match=r"config.json: --ep 3 does not divide num_experts=4"):
        convert_hf_to_megatron(moe, tmp_path / "out", ep=3, progress=False)
    with pytest.raises(ValueError, match=r"--ep 2 needs a mixture-of-experts model; dense is dense \(qwen3\)"):
        convert_hf_to_megatron(dense, tmp_path / "out", ep=2, progress=False)
    cfg = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps(dict(cfg, decoder_sparse_step=2)))
    msg = _cli_error(["hf-to-megatron", "--hf", str(moe), "--out", str(tmp_path / "out")], tmp_path)
    assert "decoder_sparse_step=2 is not supported" in msg and "config.json" in msg
