"""The pure HF <-> Megatron mapping (megatron_apo.models.hf_mapping): layouts, round trips, configs, and
logits of a Megatron model filled through it against transformers (fp32, max abs diff <= 1e-4)."""

import dataclasses

import pytest
import torch

from megatron_apo.models import load_model_config
from megatron_apo.models.hf_mapping import (
    hf_config_from_model_config,
    hf_param_names,
    hf_shapes,
    hf_to_megatron,
    megatron_param_names,
    megatron_shape,
    megatron_to_hf,
    merge_qkv,
    model_config_from_hf_config,
    split_qkv,
)
from megatron_apo.parallel import run_distributed
from tests.helpers.hf_models import SEQ, build_hf_model, hf_config, megatron_logits_from_hf_mapping, sample_tokens


def test_qkv_interleaving_matches_per_group_reference():
    cfg = load_model_config("tiny")  # 4 heads, 2 query groups, head_dim 16
    d, groups, per = cfg.head_dim, cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups
    q = torch.randn(cfg.num_attention_heads * d, 8)
    k = torch.randn(groups * d, 8)
    v = torch.randn(groups * d, 8)
    fused = merge_qkv(cfg, q, k, v)
    # Reference written out: for each group, its query heads, then its key head, then its value head.
    rows = []
    for g in range(groups):
        rows += [q[(g * per + h) * d:(g * per + h + 1) * d] for h in range(per)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    assert torch.equal(fused, torch.cat(rows))
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(cfg, fused), (q, k, v)))
    bias = merge_qkv(cfg, q[:, 0], k[:, 0], v[:, 0])
    assert torch.equal(bias, torch.cat(rows)[:, 0])


@pytest.mark.parametrize("name,te_spec,tie", [("tiny", False, False), ("tiny", True, True),
                                              ("llama3-tiny", False, True), ("llama3-tiny", True, False),
                                              ("tiny-qwen3", False, True), ("tiny-qwen3", True, False),
                                              ("tiny-qwen3-moe", False, False), ("tiny-qwen3-moe", True, True)])
def test_hf_megatron_hf_round_trip_is_bit_exact(name, te_spec, tie):
    cfg = dataclasses.replace(load_model_config(name), tie_word_embeddings=tie)
    gen = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in hf_shapes(cfg).items()}
    assert ("lm_head.weight" in hf) == (not tie)
    assert list(hf) == hf_param_names(cfg)
    reads = []

    def get(n):
        reads.append(n)
        return hf[n]

    back = {}
    for tp in (1, 2):
        for mname in megatron_param_names(cfg, te_spec=te_spec, num_pp_stages=2):
            full = hf_to_megatron(cfg, mname, get, padded_vocab_size=cfg.padded_vocab_size(tp))
            assert tuple(full.shape) == megatron_shape(cfg, mname, tp), mname
            assert full.dtype == torch.bfloat16
            if mname.startswith(("embedding", "output_layer")):
                assert torch.count_nonzero(full[cfg.vocab_size:]) == 0  # padding rows are zeros
            for hname, t in megatron_to_hf(cfg, mname, full):
                back[hname] = t
    assert sorted(back) == sorted(hf)
    for n in hf:
        assert torch.equal(back[n], hf[n]), n
    assert set(reads) == set(hf)


def _megatron_partition_dim(name: str) -> int | None:
    """How megatron-core splits each tensor across TP ranks (ColumnParallel: rows, RowParallel: columns)."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "word_embeddings.weight",
                      "output_layer.weight")):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


@pytest.mark.parametrize("name,tp,tie", [("tiny", 2, False), ("tiny", 4, False), ("llama3-tiny", 2, True),
                                         ("llama3-tiny", 4, False), ("tiny-qwen3", 2, True),
                                         ("tiny-qwen3-moe", 2, False), ("tiny-qwen3-moe", 4, True)])
def test_tp_shard_pieces_tile_the_hf_tensors_exactly(name, tp, tie):
    """megatron_shard_to_hf on each rank's tp_slice places every element of megatron_to_hf(full) once."""
    from megatron_apo.models.hf_mapping import megatron_shard_to_hf
    from megatron_apo.models.sharding import tp_slice

    cfg = dataclasses.replace(load_model_config(name), tie_word_embeddings=tie, num_query_groups=4)  # 4 | TP
    gen = torch.Generator().manual_seed(1)
    for mname in megatron_param_names(cfg, num_pp_stages=2):
        full = torch.randn(megatron_shape(cfg, mname, tp), generator=gen)
        expected = dict(megatron_to_hf(cfg, mname, full))
        pdim, gated = _megatron_partition_dim(mname), mname.endswith("linear_fc1.weight")
        filled = {n: torch.full_like(t, float("nan")) for n, t in expected.items()}
        covered = {n: torch.zeros(t.shape, dtype=torch.int64) for n, t in expected.items()}
        for r in range(tp):
            shard = tp_slice(full, pdim, r, tp, gated)
            for hname, piece, dim, start in megatron_shard_to_hf(cfg, mname, shard, pdim, r, tp):
                filled[hname].narrow(dim, start, piece.shape[dim]).copy_(piece)
                covered[hname].narrow(dim, start, piece.shape[dim]).add_(1)
            meta = megatron_shard_to_hf(cfg, mname, shard.to("meta"), pdim, r, tp)  # the plan's shape-only call
            assert [(n, tuple(p.shape), d, s) for n, p, d, s in meta] == \
                [(n, tuple(p.shape), d, s) for n, p, d, s in megatron_shard_to_hf(cfg, mname, shard, pdim, r, tp)]
        for hname in expected:
            assert bool((covered[hname] == 1).all()), (mname, hname)  # every element exactly once
            assert torch.equal(filled[hname], expected[hname]), (mname, hname)


def test_unknown_names_and_shape_mismatches_are_clear_errors():
    cfg = load_model_config("tiny")
    with pytest.raises(ValueError, match="not a Megatron GPTModel parameter"):
        megatron_to_hf(cfg, "decoder.layers.0.self_attention.core_attention.weird", torch.zeros(1))
    with pytest.raises(ValueError, match="layer 9 out of range"):
        megatron_to_hf(cfg, "decoder.layers.9.mlp.linear_fc2.weight", torch.zeros(1))
    with pytest.raises(ValueError, match="k_proj has 48 rows"):
        merge_qkv(cfg, torch.zeros(64, 64), torch.zeros(48, 64), torch.zeros(32, 64))
    with pytest.raises(ValueError, match="vocab_size=250"):
        hf_to_megatron(cfg, "embedding.word_embeddings.weight", lambda n: torch.zeros(251, 64))


@pytest.mark.parametrize("name", ["tiny", "llama3-tiny", "qwen2.5-7b", "qwen2.5-0.5b", "llama3.1-8b", "llama3.1-70b",
                                  "tiny-qwen3", "tiny-qwen3-moe"])
def test_model_config_survives_hf_config_round_trip(name):
    from transformers import AutoConfig

    cfg = load_model_config(name)
    d = hf_config_from_model_config(cfg)
    back = model_config_from_hf_config(d, name=cfg.name)
    keep = ("published_params", "extra", "make_vocab_size_divisible_by")
    assert {k: v for k, v in back.to_dict().items() if k not in keep} == \
           {k: v for k, v in cfg.to_dict().items() if k not in keep}
    # transformers reads the same values
    hf = AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    assert hf.num_key_value_heads == cfg.num_query_groups and hf.rms_norm_eps == cfg.norm_epsilon
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings
    rope = hf.rope_parameters
    assert rope["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling:
        assert rope["rope_type"] == "llama3" and rope["factor"] == cfg.rope_scaling.factor
        assert rope["original_max_position_embeddings"] == cfg.rope_scaling.original_max_position_embeddings


def test_hf_config_reading_accepts_transformers5_rope_parameters_and_rejects_unknown_architectures():
    d = hf_config("llama31")
    modern = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    modern["rope_parameters"] = dict(d["rope_scaling"], rope_theta=d["rope_theta"])
    a, b = model_config_from_hf_config(d, name="x"), model_config_from_hf_config(modern, name="x")
    assert a == b and a.rope_scaling.original_max_position_embeddings == 16 and a.rope_theta == 10000.0
    with pytest.raises(ValueError, match="architectures=\\['MistralForCausalLM'\\]"):
        model_config_from_hf_config(dict(d, architectures=["MistralForCausalLM"]))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        model_config_from_hf_config(dict(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "qwen2-tied", "llama31", "qwen3", "qwen3-moe"])
def test_megatron_filled_through_mapping_matches_transformers_logits(kind, tmp_path):
    model = build_hf_model(kind)
    model.save_pretrained(tmp_path)
    cfg = model_config_from_hf_config(hf_config(kind))
    tokens = sample_tokens(cfg.vocab_size)
    with torch.no_grad():
        ref = model(tokens).logits
    out = run_distributed(megatron_logits_from_hf_mapping, 1, str(tmp_path), tokens, timeout=180)[0]
    # the name list the mapping works from is the built model's, shape for shape
    assert out["shapes"] == {n: megatron_shape(cfg, n) for n in megatron_param_names(cfg)}
    diff = (out["logits"] - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref.abs().max() > 0.5  # a real comparison, not of near-zero logits
    if kind == "llama31":
        # the test is sensitive to RoPE scaling: without it transformers' logits move far more than 1e-4
        plain = build_hf_model(kind, config_overrides={"rope_scaling": None})
        with torch.no_grad():
            assert (plain(tokens).logits - ref).abs().max() > 1e-2
    assert tokens.shape[1] == SEQ
