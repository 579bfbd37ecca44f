"""verl-schema parquet reading (malformed files reported by row and field), templates, filtering, sampler, toy task."""

import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_apo.config import InputError
from megatron_apo.data import (
    InvalidDataError,
    PromptDataset,
    PromptSampler,
    load_tokenizer,
    make_toy_dataset,
    read_verl_parquet,
    sample_valid_answers,
    write_toy_parquet,
    write_verl_parquet,
)
from megatron_apo.data.toy import count_digit_sums
from megatron_apo.rewards import compute_score
from tests.helpers.tiny_hf import build_char_tokenizer


def good_row(i, content="k=3 sum=6 :", gt="6"):
    return {"data_source": "toy_digit_sum", "prompt": [{"role": "user", "content": content}],
            "ability": "arithmetic", "reward_model": {"ground_truth": gt, "style": "rule"},
            "extra_info": {"k": 3, "index": i}}


@pytest.fixture(scope="module")
def hf_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_char_tokenizer(d)
    return d


def test_toy_parquet_roundtrip_is_verl_schema(tmp_path):
    path = write_toy_parquet(tmp_path / "toy.parquet", 50, seed=3, k_values=(2, 3))
    schema = pq.read_schema(path)
    assert set(schema.names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert str(schema.field("prompt").type) == "list<element: struct<role: string, content: string>>"
    assert schema.field("reward_model").type.get_field_index("ground_truth") >= 0
    rows, report = read_verl_parquet(path)
    assert len(rows) == 50 and report.num_valid == 50 and not report.issues
    assert [r.to_verl() for r in rows] == make_toy_dataset(50, seed=3, k_values=(2, 3))
    assert make_toy_dataset(50, seed=3) == make_toy_dataset(50, seed=3) != make_toy_dataset(50, seed=4)


def _write(tmp_path, name, table):
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def test_missing_column_is_one_clear_error(tmp_path):
    rows = [good_row(i) for i in range(3)]
    for r in rows:
        del r["reward_model"]
    path = _write(tmp_path, "nocol.parquet", pa.Table.from_pylist(rows))
    for mode in ("error", "skip"):
        with pytest.raises(InvalidDataError, match=r"nocol.parquet: missing column\(s\) \['reward_model'\]"):
            read_verl_parquet(path, on_invalid=mode)


def test_null_ground_truth_and_empty_prompt_reported_by_row(tmp_path):
    rows = [good_row(i) for i in range(6)]
    rows[2]["reward_model"]["ground_truth"] = None
    rows[4]["prompt"] = []
    rows[5]["prompt"] = [{"role": "user", "content": "   "}]
    path = _write(tmp_path, "bad.parquet", pa.Table.from_pylist(rows))
    with pytest.raises(InvalidDataError) as err:
        read_verl_parquet(path)  # default: reject
    msg = str(err.value)
    assert "3 invalid row(s) of 6" in msg
    assert "row 2: reward_model.ground_truth: null" in msg
    assert "row 4: prompt: empty list of messages" in msg
    assert "row 5: prompt: no user message with non-empty content" in msg
    good, report = read_verl_parquet(path, on_invalid="skip")
    assert [r.index for r in good] == [0, 1, 3]
    assert report.invalid_rows == [2, 4, 5] and report.num_valid == 3


def test_wrong_types_reported_by_row_and_field(tmp_path):
    table = pa.table({
        "data_source": pa.array(["toy_digit_sum", None, "toy_digit_sum"]),
        "prompt": pa.array([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], None]),
        "reward_model": pa.array(["6", "6", "6"]),  # a plain string, not a struct
        "extra_info": pa.array([1, 2, 3]),
    })
    path = _write(tmp_path, "types.parquet", table)
    with pytest.raises(InvalidDataError) as err:
        read_verl_parquet(path)
    msg = str(err.value)
    assert "row 0: reward_model: expected a struct/dict with 'ground_truth', got str" in msg
    assert "row 0: extra_info: expected a struct/dict or null, got int" in msg
    assert "row 1: data_source: expected a non-empty string, got null" in msg
    assert "row 2: prompt: expected a list of chat messages, got null" in msg
    with pytest.raises(InvalidDataError, match="no valid rows"):
        read_verl_parquet(path, on_invalid="skip")
    # ground truth of a wrong type
    rows = [good_row(0), good_row(1)]
    for r in rows:  # parquet columns have one type: the whole column is lists here
        r["reward_model"] = {"ground_truth": ["6", "7"], "style": "rule"}
    path = _write(tmp_path, "gt_list.parquet", pa.Table.from_pylist(rows))
    with pytest.raises(InvalidDataError, match="row 0: reward_model.ground_truth: expected a string, got list"):
        read_verl_parquet(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        read_verl_parquet(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(InvalidDataError, match="junk.parquet: not a readable parquet file"):
        read_verl_parquet(junk)
    with pytest.raises(ValueError, match="on_invalid"):
        read_verl_parquet(junk, on_invalid="ignore")
    with pytest.raises(InvalidDataError, match="refusing to write an invalid row"):
        write_verl_parquet([{**good_row(0), "data_source": ""}], tmp_path / "x.parquet")


def test_plain_and_chat_templates(tmp_path, hf_tok_dir):
    tok = load_tokenizer(hf_tok_dir)
    assert tok.template == "plain"
    msgs = [{"role": "user", "content": "k=3 sum=14 :"}]
    assert tok.render_prompt(msgs) == "k=3 sum=14 :"  # verbatim
    assert tok.decode(tok.encode_prompt(msgs)) == "k=3 sum=14 :"
    assert tok.decode(tok.encode("1+2") + [tok.eos_token_id]) == "1+2"  # EOS dropped on decode
    with pytest.raises(ValueError, match="no chat_template"):
        load_tokenizer(hf_tok_dir, template="chat")
    chat_dir = tmp_path / "chat"
    build_char_tokenizer(chat_dir, chat_template=(
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"))
    chat = load_tokenizer(chat_dir)
    assert chat.template == "chat"
    assert chat.render_prompt(msgs) == "u:k=3 sum=14 : a:"
    assert load_tokenizer(chat_dir, template="plain").render_prompt(msgs) == "k=3 sum=14 :"
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")


def test_sentencepiece_tokenizer_plain_template(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    lines = []
    for row in make_toy_dataset(200, seed=0):
        total, k = int(row["reward_model"]["ground_truth"]), row["extra_info"]["k"]
        lines.append(row["prompt"][0]["content"] + " " + sample_valid_answers(total, k, rng, 1)[0])
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    tok = load_tokenizer(tmp_path / "sp.model")
    assert tok.template == "plain" and tok.eos_token_id == 1
    ids = tok.encode_prompt([{"role": "user", "content": "k=3 sum=14 :"}])
    assert tok.decode(ids + [1]) == "k=3 sum=14 :"


def test_over_length_prompts_filtered_and_counted(tmp_path, hf_tok_dir):
    tok = load_tokenizer(hf_tok_dir)
    rows = [good_row(0, "k=3 sum=6 :"), good_row(1, "k=3 sum=6 : " * 5), good_row(2, "k=3 sum=16 :")]
    path = write_verl_parquet(rows, tmp_path / "len.parquet")
    ds = PromptDataset.from_parquet(path, tok, max_prompt_length=12)
    assert [p.row.index for p in ds.items] == [0, 2]
    assert ds.report.too_long_rows == [1]
    assert "1 over the max prompt length" in ds.report.summary()
    assert len(ds[0].prompt_ids) == 11
    with pytest.raises(InvalidDataError, match="no prompts left after filtering.*max_prompt_length"):
        PromptDataset.from_parquet(path, tok, max_prompt_length=3)


def test_sampler_deterministic_resumable_and_covers_each_epoch():
    s = PromptSampler(10, seed=7)
    batches = [s.next_indices(4) for _ in range(3)]  # 12 indices: epoch 0 plus 2 of epoch 1
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == list(range(10))
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    continued = [s.next_indices(3) for _ in range(5)]
    resumed = PromptSampler(10, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_indices(3) for _ in range(5)] == continued
    again = PromptSampler(10, seed=7)
    assert [again.next_indices(4) for _ in range(3)] == batches
    other = PromptSampler(10, seed=8)
    assert [other.next_indices(4) for _ in range(3)] != batches
    assert PromptSampler(5, seed=1, shuffle=False).next_indices(7) == [0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(InputError, match="resume with the same data files"):
        PromptSampler(11, seed=7).load_state_dict(state)


def test_every_data_file_is_read_and_the_sampler_visits_all(tmp_path, hf_tok_dir):
    """data.train_files lists several files: all are read, in order, and one epoch visits the prompts of each."""
    tok = load_tokenizer(hf_tok_dir)
    a = write_verl_parquet([good_row(i, f"k=3 sum={i} :") for i in range(3)], tmp_path / "a.parquet")
    b = write_verl_parquet([good_row(i, f"k=2 sum={i} :", gt=str(i)) for i in range(5)] + [good_row(9, "x " * 20)],
                           tmp_path / "b.parquet")
    ds = PromptDataset.from_parquet([a, b], tok, max_prompt_length=12)
    assert len(ds) == 8  # 3 + 5; b's over-length row dropped and counted
    assert [p.row.messages[0]["content"][:3] for p in ds.items] == ["k=3"] * 3 + ["k=2"] * 5
    assert ds.sources == [(str(a), 3), (str(b), 5)]
    assert ds.report.total_rows == 9 and len(ds.report.too_long_rows) == 1
    assert len(PromptDataset.from_parquet(a, tok)) == 3  # one path (not a list) still works

    sampler = PromptSampler(len(ds), seed=3, sources=ds.sources)
    seen = {ds[i].row.messages[0]["content"] for i in sampler.next_indices(8)}
    assert len(seen) == 8  # one epoch: every prompt of both files once

    # resume: same files (even renamed) continue; files with other prompt counts are one clear error
    state = sampler.state_dict()
    assert state["sources"] == [["a.parquet", 3], ["b.parquet", 5]]
    renamed = PromptSampler(8, seed=3, sources=[("a2.parquet", 3), ("b2.parquet", 5)])
    renamed.load_state_dict(state)
    assert renamed.next_indices(4) == sampler.next_indices(4)
    with pytest.raises(InputError, match=r"a.parquet \(3\), b.parquet \(5\).*resume with the same data files"):
        PromptSampler(8, seed=3, sources=[("b.parquet", 5), ("a.parquet", 3)]).load_state_dict(state)
    with pytest.raises(InputError, match="for 8 prompts .* has 3"):
        PromptSampler(3, seed=3, sources=[("a.parquet", 3)]).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "sources"}  # a checkpoint written before multi-file data
    PromptSampler(8, seed=3, sources=ds.sources).load_state_dict(legacy)


def test_toy_dataset_and_valid_answers():
    rows = make_toy_dataset(100, seed=0, k_values=(2, 3), min_solutions=3)
    assert {r["extra_info"]["k"] for r in rows} == {2, 3}
    for r in rows:
        k, total = r["extra_info"]["k"], int(r["reward_model"]["ground_truth"])
        assert r["prompt"][0]["content"] == f"k={k} sum={total} :"
        assert count_digit_sums(k, total) >= 3
    assert count_digit_sums(3, 14) == 75 and count_digit_sums(2, 18) == 1 and count_digit_sums(1, 10) == 0
    rng = random.Random(0)
    answers = sample_valid_answers(14, 3, rng, 300)
    assert all(compute_score("toy_digit_sum", a, "14", {"k": 3}) == 1.0 for a in answers)
    assert len(set(answers)) > 50  # diverse: most of the 75 answers appear
    # Uniform over the valid tuples: k=2, N=9 has 10 answers, each ~1/10 of 5000 draws.
    freq = Counter(sample_valid_answers(9, 2, random.Random(1), 5000))
    assert len(freq) == 10 and all(400 <= c <= 600 for c in freq.values())
    with pytest.raises(ValueError, match="no 2 digits sum to 19"):
        sample_valid_answers(19, 2, rng, 1)
