"""HF -> Megatron conversion at TP=2 and at PP=2: the converted Megatron model (loaded back from its dist
checkpoint, run through Megatron's pipeline schedule) matches transformers' logits, fp32, max abs diff <= 1e-4.
Tiny random Qwen2 (untied and tied, vocab 250), Llama-3.1-style (RoPE scaling, vocab 300) and Qwen3 (QK-norm, tied,
head_dim != hidden/heads) models. Qwen3-MoE at TP x EP: test_qwen3_convert.py."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_apo.models.convert import convert_megatron_to_hf
from megatron_apo.parallel import run_distributed
from tests.helpers.hf_models import build_hf_model, convert_then_run, sample_tokens

pytestmark = pytest.mark.slow  # every test here takes more than ~10 s on 2 cores

KINDS = ("qwen2", "qwen2-tied", "llama31", "qwen3")


def _hf_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    refs = {}
    for kind in KINDS:
        model = build_hf_model(kind)
        model.save_pretrained(root / kind)
        with torch.no_grad():
            refs[kind] = model(sample_tokens(model.config.vocab_size)).logits
        assert refs[kind].abs().max() > 0.5  # real logits, not near zero
    return root, refs


def _last_stage(results):
    found = [r for r in results if any(v is not None for v in r.values())]
    assert len(found) == 1
    return found[0]


@pytest.fixture(scope="module")
def tp2_results(hf_models, tmp_path_factory):
    root, _ = hf_models
    out = tmp_path_factory.mktemp("tp2")
    jobs = [(k, str(root / k), str(out / k)) for k in KINDS]
    return out, _last_stage(run_distributed(convert_then_run, 2, 2, 1, jobs, [], timeout=240))


def test_tp2_conversion_matches_transformers(hf_models, tp2_results):
    _, refs = hf_models
    _, logits = tp2_results
    for kind in KINDS:
        diff = (logits[kind] - refs[kind]).abs().max().item()
        assert diff <= TOL, (kind, diff)


def test_pp2_conversion_and_tp2_checkpoint_resharded_to_pp2_match_transformers(hf_models, tp2_results, tmp_path):
    root, refs = hf_models
    tp2_dir, _ = tp2_results
    jobs = [(k, str(root / k), str(tmp_path / k)) for k in KINDS]
    # the TP=2 checkpoints load at PP=2 too (dist_checkpointing reshards; Llama's padded vocab 512 -> 384)
    reload = [(f"{k}@tp2", str(tp2_dir / k)) for k in KINDS]
    logits = _last_stage(run_distributed(convert_then_run, 2, 1, 2, jobs, reload, timeout=240))
    for kind in KINDS:
        for name in (kind, f"{kind}@tp2"):
            diff = (logits[name] - refs[kind]).abs().max().item()
            assert diff <= TOL, (name, diff)


def test_llama31_tp2_checkpoint_exports_bit_exact_and_bf16_export_reports_downcast(hf_models, tp2_results, tmp_path):
    """HF -> Megatron TP=2 (the conversion above) -> HF; the round trip at TP=2 x PP=2 is in test_convert_roundtrip."""
    root, _ = hf_models
    meg = tp2_results[0] / "llama31"
    rep = convert_megatron_to_hf(meg, tmp_path / "back", progress=False)
    assert rep.dtype == "float32" and rep.max_abs_delta is None
    a, b = _hf_tensors(root / "llama31"), _hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b) and "lm_head.weight" in b
    assert all(torch.equal(a[n], b[n]) for n in a)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (cfg["rope_scaling"]["rope_type"] == "llama3"
            and cfg["rope_scaling"]["original_max_position_embeddings"] == 16)
    assert cfg["rms_norm_eps"] == 1e-5

    rep = convert_megatron_to_hf(meg, tmp_path / "bf16", dtype="bf16", progress=False)
    c = _hf_tensors(tmp_path / "bf16")
    want_delta = max((a[n] - a[n].to(torch.bfloat16).float()).abs().max().item() for n in a)
    assert all(c[n].dtype == torch.bfloat16 and torch.equal(c[n], a[n].to(torch.bfloat16)) for n in a)
    assert rep.max_abs_delta == pytest.approx(want_delta) and rep.max_abs_delta > 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "max |delta|" in rep.summary()
