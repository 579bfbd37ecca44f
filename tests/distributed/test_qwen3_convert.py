"""Qwen3-MoE HF -> Megatron at TP=2 x EP=2 (4 gloo ranks, each filling its own two experts): the checkpoint, loaded
back at TP=2 and at TP=1 x PP=2 (the expert storage reshards to EP=1) and run through Megatron's schedule, matches
transformers' Qwen3MoeForCausalLM logits (fp32, max abs diff <= 1e-4), and exports back to HF bit-exact. Tiny
random model: 4 experts, top-2, QK-norm."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_apo.models.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_apo.parallel import run_distributed
from tests.helpers.hf_models import build_hf_model, convert_then_run, sample_tokens

TOL = 1e-4
pytestmark = pytest.mark.slow  # two 4-/2-rank runs of MoE models, about 60 s on a busy 2-core machine


def _hf_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _found(results):
    found = [r for r in results if any(v is not None for v in r.values())]
    assert len(found) == 1
    return found[0]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    model = build_hf_model("qwen3-moe")
    model.save_pretrained(root / "hf")
    with torch.no_grad():
        ref = model(sample_tokens(model.config.vocab_size)).logits
    assert ref.abs().max() > 0.5
    rep = convert_hf_to_megatron(root / "hf", root / "tp2ep2", tp=2, ep=2, progress=False)
    return root, ref, rep


def test_tp2_ep2_conversion_writes_each_tensor_once_with_its_layout(moe):
    import json

    root, _, rep = moe
    meta = json.loads((root / "tp2ep2" / "megatron_apo.json").read_text())
    assert meta["expert_model_parallel_size"] == 2 and meta["tensor_model_parallel_size"] == 2
    # every Megatron tensor counted once over the 4 ranks: 2 layers x (norms, qkv, proj, q/k norm, router,
    # 4 experts x 2) + embedding, final norm, output layer
    assert rep.num_tensors == 2 * (7 + 4 * 2) + 3


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp2_ep2_checkpoint_reloads_at_ep1_and_matches_transformers(moe, tp, pp):
    root, ref, _ = moe
    logits = _found(run_distributed(convert_then_run, tp * pp, tp, pp, [], [("moe@tp2ep2", str(root / "tp2ep2"))],
                                    1, timeout=300))
    diff = (logits["moe@tp2ep2"] - ref).abs().max().item()
    assert diff <= TOL, diff


def test_tp2_ep2_checkpoint_exports_bit_exact(moe, tmp_path):
    root, _, _ = moe
    rep = convert_megatron_to_hf(root / "tp2ep2", tmp_path / "back", progress=False)
    a, b = _hf_tensors(root / "hf"), _hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b) and "model.layers.1.mlp.experts.3.down_proj.weight" in b
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert rep.num_tensors == len(a) and rep.max_abs_delta is None
