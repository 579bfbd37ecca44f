"""pass@k evaluation: the runner's bookkeeping and `megatron-apo eval` end to end (CPUEngine in process)."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megatron_apo.data import PromptDataset, PromptRow, load_tokenizer, write_toy_parquet, write_verl_parquet
from megatron_apo.eval import EvalConfig, evaluate, load_results, pass_at_k, plot_pass_at_k
from megatron_apo.rollout import RolloutEngine, Sample
from tests.helpers.tiny_hf import build_char_tokenizer, build_tiny_model_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny_qwen2"), seed=0)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


class ScriptedEngine(RolloutEngine):
    """Answers each prompt with a fixed list of response strings (a real RolloutEngine, for exact bookkeeping)."""

    def __init__(self, tokenizer, answers: dict[str, list[str]]):
        self.tok, self.answers = tokenizer, answers

    def generate(self, prompt_token_ids, params):
        out = []
        for i, ids in enumerate(prompt_token_ids):
            texts = self.answers[self.tok.decode(ids)]
            assert len(texts) == params.n
            out.append([Sample(i, j, self.tok.encode(t) + [self.tok.eos_token_id], [0.0] * (len(t) + 1), "stop")
                        for j, t in enumerate(texts)])
        return out

    def update_weights(self, version, named_tensors):
        raise NotImplementedError

    def weights_version(self):
        return -1

    def join_sync_group(self, endpoint, rank):  # evaluation never syncs weights
        raise NotImplementedError

    def receive_weights(self, version):
        raise NotImplementedError


def test_runner_counts_and_pass_at_k_per_source(tmp_path):
    build_char_tokenizer(tmp_path, extra_chars="\\boxed{}xy")
    tok = load_tokenizer(tmp_path)
    rows = [
        PromptRow(0, [{"role": "user", "content": "k=2 sum=3 :"}], "3", "toy_digit_sum", {"k": 2}),
        PromptRow(1, [{"role": "user", "content": "k=2 sum=9 :"}], "9", "toy_digit_sum", {"k": 2}),
        PromptRow(2, [{"role": "user", "content": "k=1 sum=5 :"}], "5", "math", {}),
    ]
    answers = {
        "k=2 sum=3 :": ["1+2", "2+1", "0+3", "1+1"],  # 3 of 4 correct
        "k=2 sum=9 :": ["1+1", "9", "", "4+4"],  # 0 of 4
        "k=1 sum=5 :": ["5", "\\boxed{5}", "x", "y"],  # math: only the boxed one counts
    }
    ds = PromptDataset(rows, tok)
    res = evaluate(ScriptedEngine(tok, answers), tok, ds.items, EvalConfig(n=4, prompts_per_call=2),
                   label="scripted", progress=False)
    assert [p["correct"] for p in res["per_prompt"]] == [3, 0, 1]
    assert res["k_values"] == [1, 2, 4]
    toy, math_ = res["per_data_source"]["toy_digit_sum"], res["per_data_source"]["math"]
    for k in (1, 2, 4):
        assert toy[f"pass@{k}"] == pytest.approx((pass_at_k(4, 3, k) + pass_at_k(4, 0, k)) / 2)
        assert math_[f"pass@{k}"] == pytest.approx(pass_at_k(4, 1, k))
        want = (pass_at_k(4, 3, k) + pass_at_k(4, 0, k) + pass_at_k(4, 1, k)) / 3
        assert res["overall"][f"pass@{k}"] == pytest.approx(want)
    assert res["overall"]["num_samples"] == 12 and res["generation"]["finish_reasons"] == {"stop": 12}
    assert res["examples"][0]["response"] == "1+2"


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "eval", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"eval failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _cli_in_process(*args) -> str:
    """The CLI entry point in this process (saves a torch import per call); returns what it printed."""
    import contextlib
    import io

    from megatron_apo.cli import main

    threads, buf = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert main(["eval", *map(str, args)]) == 0
    finally:
        torch.set_num_threads(threads)  # the CPU engine pins this process to one thread
    return buf.getvalue()


@pytest.mark.slow
def test_cli_eval_writes_json_and_png_and_overlays(model_dir, tmp_path):
    # k=1 prompts with one new token: a random model is right ~1/21 of the time, so pass@k rises with k.
    data = write_toy_parquet(tmp_path / "toy.parquet", 6, seed=0, k_values=(1,), min_solutions=1)
    out1 = tmp_path / "run1"
    proc = _cli("--model", model_dir, "--data", data, "--n", 16, "--max-new-tokens", 1, "--out", out1,
                "--label", "reference", "--reward-workers", 1)
    assert "pass@16" in proc.stdout and "reference" in proc.stdout
    res = load_results(out1 / "pass_at_k.json")
    assert res["label"] == "reference" and res["k_values"] == [1, 2, 4, 8, 16]
    assert res["overall"]["num_prompts"] == 6 and res["meta"]["template"] == "plain"
    curve = [res["overall"][f"pass@{k}"] for k in res["k_values"]]
    assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))
    mean_c = sum(p["correct"] for p in res["per_prompt"]) / (6 * 16)
    assert res["overall"]["pass@1"] == pytest.approx(mean_c)  # pass@1 is the fraction of correct samples
    assert curve[-1] > curve[0] > 0  # the random model hits sometimes, more often with more tries
    png = out1 / "pass_at_k.png"
    w, h = png_size(png)
    assert png.stat().st_size > 10_000 and 400 <= w <= 3000 and 300 <= h <= 2000

    # A second run with a user reward function, plotted over the first.
    reward = tmp_path / "my_reward.py"
    reward.write_text("def any_digit(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(any(c.isdigit() for c in solution_str))\n")
    out2 = tmp_path / "run2"
    _cli_in_process("--model", model_dir, "--data", data, "--n", 8, "--max-new-tokens", 2, "--out", out2,
                    "--label", "any-digit", "--reward-fn", f"{reward}:any_digit", "--reward-workers", 0,
                    "--overlay", out1 / "pass_at_k.json")
    res2 = load_results(out2 / "pass_at_k.json")
    assert res2["overall"]["pass@1"] > res["overall"]["pass@1"]
    w2, _ = png_size(out2 / "pass_at_k.png")
    assert w2 >= 400

    # Overlay only: no model, just plot earlier results together.
    out3 = tmp_path / "overlay"
    stdout = _cli_in_process("--overlay", out1 / "pass_at_k.json", out2 / "pass_at_k.json", "--out", out3)
    assert "reference" in stdout and "any-digit" in stdout
    assert (out3 / "pass_at_k.png").stat().st_size > 10_000 and not (out3 / "pass_at_k.json").exists()


def test_cli_eval_errors_are_one_line(model_dir, tmp_path, capsys):
    from megatron_apo.cli import main

    def run(*args):  # the CLI's own entry point, in process (the subprocess path is covered above)
        code = main(["eval", *map(str, args)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "error:" in err, err
        return err

    ok = write_verl_parquet([{"data_source": "toy_digit_sum", "prompt": [{"role": "user", "content": "k=1 sum=1 :"}],
                              "reward_model": {"ground_truth": "1", "style": "rule"}, "extra_info": {"k": 1}}],
                            tmp_path / "ok.parquet")
    assert "model folder not found" in run("--model", tmp_path / "nope", "--data", ok, "--out", tmp_path / "o")
    (tmp_path / "iter_x").mkdir()
    assert "neither a Hugging Face folder" in run("--model", tmp_path / "iter_x", "--data", ok, "--out", tmp_path / "o")
    assert "dataset file not found" in run("--model", model_dir, "--data", tmp_path / "x.parquet", "--out", tmp_path)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"data_source": "toy_digit_sum", "prompt": [{"role": "user", "content": "x"}],
                                          "reward_model": {"ground_truth": None, "style": "rule"}}]), bad)
    err = run("--model", model_dir, "--data", bad, "--out", tmp_path / "o")
    assert "row 0: reward_model.ground_truth: null" in err and "--skip-invalid" in err
    assert "--overlay" in run("--out", tmp_path / "o")
    assert "not a megatron-apo pass@k results file" in run("--overlay", ok, "--out", tmp_path / "o")
    # a model the engines cannot load: one line naming its config.json, and no --out left behind
    other = tmp_path / "gpt_neox"
    other.mkdir()
    for f in model_dir.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    err = run("--model", other, "--data", ok, "--out", tmp_path / "o_arch")
    assert "config.json: architectures=['GPTNeoXForCausalLM'] is not supported" in err
    assert not (tmp_path / "o_arch").exists()


def test_plot_overlays_runs_with_a_panel_per_data_source(tmp_path):
    def fake(label, p1):  # results dicts as the runner writes them
        per = {"pass@1": p1, "pass@2": min(1, 1.6 * p1), "pass@4": min(1, 2.2 * p1)}
        summary = {"num_prompts": 10, "num_samples": 40, "mean_reward": p1, **per}
        return {"format": "megatron-apo/pass_at_k/v1", "label": label, "k_values": [1, 2, 4],
                "config": {"n": 4}, "overall": summary, "per_data_source": {"a": summary, "b": summary}}

    path = plot_pass_at_k({"reference": fake("reference", 0.2), "grpo": fake("grpo", 0.45),
                           "apo": fake("apo", 0.4)}, tmp_path / "overlay.png")
    w, h = png_size(path)
    assert w > 1200 and h >= 300  # three panels: overall, a, b
    with pytest.raises(ValueError, match="no runs"):
        plot_pass_at_k({}, tmp_path / "empty.png")
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a megatron-apo pass@k results file"):
        load_results(tmp_path / "bad.json")
