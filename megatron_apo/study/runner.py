"""`megatron-apo study`: methods x seeds -> RL runs on the real stack -> pass@k at large n -> one report.

Every run is the real `train()` (Megatron trainer on `tp` local processes, Ray CPU rollout fleet, weight sync,
pass@k evaluation of the fleet's weights at the start and the end). Layout under `out_dir`:

  data/        the task (parquet, tokenizer, model shape) and task.json
  sft/         the reference checkpoint (kind=toy_code)
  runs/<method>/seed_<s>/   one RL run; `done.json` is written last, and a run that has it is never re-run
  results.json, report.md, pass_at_k.png, dynamics.png

A killed study continues where it stopped: finished runs are kept, an unfinished run starts over.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from megatron_apo.parallel import run_distributed
from megatron_apo.study.config import StudyConfig, as_dict


def log(msg: str) -> None:
    print(f"study [{time.strftime('%H:%M:%S')}]: {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# the task and the reference


def train_char_tokenizer(lines: list[str], prefix: Path) -> Path:
    """A character-level sentencepiece model with specials at fixed ids (pad 0, unk 1, bos 2, eos 3)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="char",
                                   vocab_size=40, hard_vocab_limit=False, character_coverage=1.0, pad_id=0,
                                   unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    return prefix.with_suffix(".model")


def prepare_task(cfg: StudyConfig, out: Path) -> dict:
    """Writes (once) the toy task's parquet files, SFT demonstrations, tokenizer and model shape."""
    data = out / "data"
    info_file = data / "task.json"
    if cfg.task.kind == "files":
        return {"train": cfg.task.train, "val": cfg.task.val, "tokenizer": cfg.task.tokenizer,
                "model": cfg.task.model, "pairs": None, "pad_id": None}
    import yaml

    from megatron_apo.data.collapse_task import (
        CodeTaskConfig,
        behaviour_valid_prob,
        eval_rows,
        make_categories,
        sft_pairs,
        train_rows,
    )
    from megatron_apo.data.parquet import write_verl_parquet
    from megatron_apo.data.tokenizer import load_tokenizer
    from megatron_apo.models import load_model_config

    t = cfg.task
    cats = make_categories(CodeTaskConfig(t.num_categories, t.hard_fraction, t.easy_popular_mass,
                                          t.hard_popular_mass, t.seed))
    data.mkdir(parents=True, exist_ok=True)
    write_verl_parquet(train_rows(cats), data / "train.parquet")
    write_verl_parquet(eval_rows(cats), data / "val.parquet")
    pairs_text = sft_pairs(cats, cfg.reference.sft_per_category, cfg.reference.seed)
    tok_file = train_char_tokenizer([f"{p} {a}" for p, a in pairs_text]
                                    + [f"{c.prompt} {v}" for c in cats for v in c.valid],
                                    data / "toy_sp")
    tok = load_tokenizer(tok_file)
    eos = tok.stop_token_ids[0]
    pairs = [(tok.encode_prompt([{"role": "user", "content": p}]), tok.encode(a) + [eos]) for p, a in pairs_text]
    vocab = tok.sp.get_piece_size()
    model_cfg = dict(load_model_config(t.model).to_dict(), name=f"{t.model}-toy", vocab_size=vocab)
    (data / "model.yaml").write_text(yaml.safe_dump(model_cfg))
    info = {"vocab_size": vocab, "categories": [
        {"index": c.index, "prompt": c.prompt, "split": c.split, "valid": list(c.valid),
         "behaviour_valid_prob": behaviour_valid_prob(c)} for c in cats]}
    info_file.write_text(json.dumps(info, indent=1) + "\n")
    return {"train": str(data / "train.parquet"), "val": str(data / "val.parquet"), "tokenizer": str(tok_file),
            "model": str(data / "model.yaml"), "pairs": pairs, "pad_id": tok.pad_token_id or 0}


def ensure_reference(cfg: StudyConfig, paths: dict, out: Path) -> str:
    """The reference checkpoint: the configured one, or SFT on the task's demonstrations (once)."""
    if cfg.reference.checkpoint:
        return cfg.reference.checkpoint
    from megatron_apo.trainer.checkpoint import latest_checkpoint
    from megatron_apo.trainer.sft import SFTConfig, make_sft_tensors, sft_train

    sft_dir = out / "sft"
    if (sft_dir / "done.json").is_file() and latest_checkpoint(sft_dir) is not None:
        return str(sft_dir)
    shutil.rmtree(sft_dir, ignore_errors=True)
    r = cfg.reference
    log(f"SFT of the reference on {len(paths['pairs'])} demonstrations ({r.sft_steps} steps, TP={cfg.tp})")
    tokens, mask = make_sft_tensors(paths["pairs"], paths["pad_id"])
    sft = SFTConfig(model=paths["model"], tp=cfg.tp, steps=r.sft_steps, seed=r.seed, batch_size=r.sft_batch_size,
                    micro_batch_size=r.sft_batch_size, lr=r.sft_lr)
    losses = run_distributed(sft_train, cfg.tp, sft, tokens, mask, str(sft_dir), timeout=cfg.run_timeout_s)[0]
    (sft_dir / "done.json").write_text(json.dumps({"final_loss": losses[-1]}) + "\n")
    return str(sft_dir)


# ----------------------------------------------------------------------------------------------------------
# one RL run


def run_overrides(cfg: StudyConfig, paths: dict, ref_ckpt: str, run_dir: Path, method: str, seed: int) -> list[str]:
    base = [
        f"model.config={paths['model']}", f"parallel.tensor_model_parallel_size={cfg.tp}", f"seed={seed}",
        f"out_dir={run_dir}", f"checkpoint.load={ref_ckpt}", "checkpoint.save_interval=0", "checkpoint.keep_last=1",
        f"data.train_files=[{paths['train']}]", f"data.val_files=[{paths['val']}]",
        f"data.tokenizer={paths['tokenizer']}",
        f"trainer.eval_n={cfg.eval_n}", "trainer.eval_max_prompts=100000", "trainer.tensorboard=false",
        "trainer.progress=false",
    ]
    return base + list(cfg.rl) + list(cfg.methods[method])


def _train_entry(rcfg):
    from megatron_apo.trainer.train import train

    return train(rcfg).history


def run_dir_of(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed_{seed}"


def run_one(cfg: StudyConfig, paths: dict, ref_ckpt: str, out: Path, method: str, seed: int) -> dict:
    """Trains one (method, seed) unless it has finished before; returns its done.json."""
    from megatron_apo.config import load_config

    run_dir = run_dir_of(out, method, seed)
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
    rcfg = load_config(None, run_overrides(cfg, paths, ref_ckpt, run_dir, method, seed))
    t0 = time.time()
    history = run_distributed(_train_entry, cfg.tp, rcfg, timeout=cfg.run_timeout_s)[0]
    evals = sorted((run_dir / "eval").glob("step_*.json"))
    if len(evals) < 2:
        raise RuntimeError(f"study: run {method}/seed_{seed} wrote {len(evals)} eval files in {run_dir}/eval, "
                           "expected the initial and the final one")
    record = {"method": method, "seed": seed, "seconds": time.time() - t0, "initial_eval": str(evals[0]),
              "final_eval": str(evals[-1]), "history": history}
    done.write_text(json.dumps(record) + "\n")
    return record


def run_study(cfg: StudyConfig, out: str | Path | None = None) -> dict:
    """The whole study; resumable. Returns the results dict (also written to results.json)."""
    from megatron_apo.study.analysis import analyse, write_report

    out = Path(out or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.json").write_text(json.dumps(as_dict(cfg), indent=1) + "\n")
    t0 = time.time()
    paths = prepare_task(cfg, out)
    ref_ckpt = ensure_reference(cfg, paths, out)
    jobs = [(m, s) for s in cfg.seeds for m in cfg.methods]  # seed-major: every method gets seed 1 first
    for i, (method, seed) in enumerate(jobs):
        fresh = not (run_dir_of(out, method, seed) / "done.json").is_file()
        if fresh:
            log(f"run {i + 1}/{len(jobs)}: {method} seed {seed}")
        rec = run_one(cfg, paths, ref_ckpt, out, method, seed)
        if fresh:
            final = json.loads(Path(rec["final_eval"]).read_text())["overall"]
            log(f"  {method} seed {seed} done in {rec['seconds']:.0f}s: pass@1 {final['pass@1']:.3f}, "
                f"pass@{cfg.eval_n} {final.get(f'pass@{cfg.eval_n}', float('nan')):.3f}")
    results = analyse(cfg, out)
    write_report(cfg, results, out)
    log(f"done in {(time.time() - t0) / 60:.1f} min; wrote {out}/results.json, report.md, pass_at_k.png, dynamics.png")
    return results
