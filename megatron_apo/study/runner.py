"""`megatron-apo study`: methods x replicates -> RL runs on the real stack -> pass@k -> one report.

Every run is the real `train()` (Megatron trainer on `tp` local processes, Ray CPU rollout fleet, weight sync).
Evaluation: `eval_mode: sampled` samples eval_n responses per prompt from the fleet at the start and the end;
`eval_mode: exact` teacher-forces every listed valid answer on the reference and on the run's final checkpoint
(eval/exact.py): no sampling noise, and no sampling time. Layout under `out_dir`:

  data/, sft/                 the task (parquet, tokenizer, model shape, task.json) and its reference checkpoint;
                              with task.instances, one inst_<i>/{data,sft} per task instance
  runs/<method>/seed_<s>/     one RL run (inst_<i>_seed_<s>/ with instances); `done.json` is written last, and a
                              run that has it is never re-run
  results.json, report.md, pass_at_k.png, dynamics.png

A stopped or killed study continues where it stopped: finished runs are kept, an unfinished run starts over. A stop
signal (SIGTERM) reaches the run's ranks, which stop after their step; if the study process dies, the kernel sends
them SIGTERM (no rank outlives the study).

Start-up is shared: the study process starts ONE local Ray cluster before its first run and every run's trainer
attaches to it (`rollout.ray_address`), instead of each run starting and stopping a cluster of its own (GPU engines
keep a cluster per run: see StudyRay). A run's fleet
still closes and kills its engines at the run's end, so every run starts on an empty cluster. The study shuts the
cluster down when it ends, stops (SIGTERM) or fails; if the study is killed, Ray's GCS and raylet die with it (Ray
starts them with a parent-death signal) and their engine workers and agents exit when they find the raylet gone.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

from megatron_apo.config import ConfigError, UserError
from megatron_apo.parallel import RanksStopped, run_distributed
from megatron_apo.study.config import StudyConfig, as_dict, replicate_name, replicates, report_dir


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


def train_word_tokenizer(lines: list[str], prefix: Path, vocab_size: int) -> Path:
    """A word-level sentencepiece model (one token per whitespace-separated word), specials as above."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="word",
                                   vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, unk_id=1, bos_id=2,
                                   eos_id=3, minloglevel=2)
    return prefix.with_suffix(".model")


def instance_dir(out: Path, instance: Optional[int]) -> Path:
    """Where an instance's task data and reference live (the study's root for the single-task layout)."""
    return out if instance is None else out / f"inst_{instance}"


def _generated_task(cfg: StudyConfig, seed: int, data: Path):
    """(train rows, eval rows, SFT (prompt, answer) texts, tokenizer file, task.json info) of a generated task."""
    t = cfg.task
    if t.kind == "toy_squeeze":
        from megatron_apo.data.squeeze_task import (
            SqueezeTaskConfig,
            make_squeeze_categories,
            reference_topk_mass,
            squeeze_behaviour_valid_prob,
            squeeze_eval_rows,
            squeeze_sft_pairs,
            squeeze_train_rows,
            vocabulary_lines,
        )

        try:
            tcfg = SqueezeTaskConfig(**{"num_categories": t.num_categories, "hard_fraction": t.hard_fraction,
                                        **dict(t.squeeze), "seed": seed})
        except TypeError as e:
            raise ConfigError(f"task.squeeze: {e} (the keys are SqueezeTaskConfig's fields)") from None
        cats = make_squeeze_categories(tcfg)
        lines = vocabulary_lines(cats, tcfg)
        tok_file = train_word_tokenizer(lines, data / "toy_sp", vocab_size=len(lines[0].split()) + len(cats) + 4)
        info = [{"index": c.index, "prompt": c.prompt, "split": c.split, "valid": [list(v) for v in c.valid],
                 "behaviour_valid_prob": squeeze_behaviour_valid_prob(c), "reference_top8_mass":
                 reference_topk_mass(c, 8)} for c in cats]
        return (squeeze_train_rows(cats), squeeze_eval_rows(cats),
                squeeze_sft_pairs(cats, cfg.reference.sft_per_category, cfg.reference.seed), tok_file, info)
    from megatron_apo.data.collapse_task import (
        CodeTaskConfig,
        behaviour_valid_prob,
        eval_rows,
        make_categories,
        sft_pairs,
        train_rows,
    )

    cats = make_categories(CodeTaskConfig(t.num_categories, t.hard_fraction, t.easy_popular_mass,
                                          t.hard_popular_mass, seed))
    pairs_text = sft_pairs(cats, cfg.reference.sft_per_category, cfg.reference.seed)
    tok_file = train_char_tokenizer([f"{p} {a}" for p, a in pairs_text]
                                    + [f"{c.prompt} {v}" for c in cats for v in c.valid], data / "toy_sp")
    info = [{"index": c.index, "prompt": c.prompt, "split": c.split, "valid": list(c.valid),
             "behaviour_valid_prob": behaviour_valid_prob(c)} for c in cats]
    return train_rows(cats), eval_rows(cats), pairs_text, tok_file, info


def prepare_task(cfg: StudyConfig, out: Path, instance: Optional[int] = None) -> dict:
    """Writes the generated task's parquet files, SFT demonstrations, tokenizer and model shape (instance: the
    task seed, else task.seed)."""
    data = instance_dir(out, instance) / "data"
    info_file = data / "task.json"
    if cfg.task.kind == "files":
        return {"train": cfg.task.train, "val": cfg.task.val, "tokenizer": cfg.task.tokenizer,
                "model": cfg.task.model, "pairs": None, "pad_id": None}
    import yaml

    from megatron_apo.data.parquet import write_verl_parquet
    from megatron_apo.data.tokenizer import load_tokenizer
    from megatron_apo.models import load_model_config

    data.mkdir(parents=True, exist_ok=True)
    train, val, pairs_text, tok_file, categories = _generated_task(
        cfg, cfg.task.seed if instance is None else instance, data)
    write_verl_parquet(train, data / "train.parquet")
    write_verl_parquet(val, data / "val.parquet")
    tok = load_tokenizer(tok_file)
    eos = tok.stop_token_ids[0]
    pairs = [(tok.encode_prompt([{"role": "user", "content": p}]), tok.encode(a) + [eos]) for p, a in pairs_text]
    vocab = tok.sp.get_piece_size()
    model_cfg = dict(load_model_config(cfg.task.model).to_dict(), name=f"{cfg.task.model}-toy", vocab_size=vocab)
    (data / "model.yaml").write_text(yaml.safe_dump(model_cfg))
    info_file.write_text(json.dumps({"vocab_size": vocab, "kind": cfg.task.kind, "categories": categories},
                                    indent=1) + "\n")
    return {"train": str(data / "train.parquet"), "val": str(data / "val.parquet"), "tokenizer": str(tok_file),
            "model": str(data / "model.yaml"), "pairs": pairs, "pad_id": tok.pad_token_id or 0}


def ensure_reference(cfg: StudyConfig, paths: dict, base: Path) -> str:
    """The reference checkpoint: the configured one, or SFT on the task's demonstrations (once per instance)."""
    if cfg.reference.checkpoint:
        return cfg.reference.checkpoint
    from megatron_apo.trainer.checkpoint import latest_checkpoint
    from megatron_apo.trainer.sft import SFTConfig, make_sft_tensors, sft_train

    sft_dir = base / "sft"
    if (sft_dir / "done.json").is_file() and latest_checkpoint(sft_dir) is not None:
        return str(sft_dir)
    shutil.rmtree(sft_dir, ignore_errors=True)
    r = cfg.reference
    log(f"SFT of the reference on {len(paths['pairs'])} demonstrations ({r.sft_steps} steps, TP={cfg.tp})")
    tokens, mask = make_sft_tensors(paths["pairs"], paths["pad_id"])
    sft = SFTConfig(model=paths["model"], tp=cfg.tp, steps=r.sft_steps, seed=r.seed, batch_size=r.sft_batch_size,
                    micro_batch_size=r.sft_batch_size, lr=r.sft_lr)
    losses = run_distributed(sft_train, cfg.tp, sft, tokens, mask, str(sft_dir), timeout=cfg.run_timeout_s,
                             forward_signals=(signal.SIGTERM,))[0]
    (sft_dir / "done.json").write_text(json.dumps({"final_loss": losses[-1]}) + "\n")
    return str(sft_dir)


# ----------------------------------------------------------------------------------------------------------
# one RL run


def run_overrides(cfg: StudyConfig, paths: dict, ref_ckpt: str, run_dir: Path, method: str, seed: int,
                  ray_address: Optional[str] = None) -> list[str]:
    """The run's config overrides: the study's, then `rl`, then the method's (a later one wins). `ray_address`: the
    study's Ray cluster (a `rollout.ray_address` in `rl` or in a method's overrides wins over it)."""
    base = [
        f"model.config={paths['model']}", f"parallel.tensor_model_parallel_size={cfg.tp}", f"seed={seed}",
        f"out_dir={run_dir}", f"checkpoint.load={ref_ckpt}", "checkpoint.save_interval=0", "checkpoint.keep_last=1",
        f"data.train_files=[{paths['train']}]", f"data.val_files=[{paths['val']}]",
        f"data.tokenizer={paths['tokenizer']}",
        # exact evaluation reads the final checkpoint after the run: the trainer samples no evaluation
        f"trainer.eval_n={0 if cfg.eval_mode == 'exact' else cfg.eval_n}", "trainer.eval_max_prompts=100000",
        "trainer.tensorboard=false", "trainer.progress=false",
    ] + ([f"rollout.ray_address={ray_address}"] if ray_address else [])
    return base + list(cfg.rl) + list(cfg.methods[method])


def _train_entry(rcfg):
    from megatron_apo.trainer.train import train

    result = train(rcfg)
    return result.history, result.stopped_at


def run_dir_of(out: Path, method: str, seed: int, instance: Optional[int] = None) -> Path:
    return out / "runs" / method / replicate_name(instance, seed)


class StudyStopped(UserError):
    """A stop signal ended the study between two steps of a run; rerunning the same command continues."""


class StudyRay:
    """The study's one local Ray cluster, shared by its runs: started on first use, in this process, bound to the
    loopback interface (`init_ray`); `close()` shuts it down with every process it started (`shutdown_ray`). Not
    started when `rl` names a cluster of the user's (`rollout.ray_address`), nor for GPU engines (vLLM on a GPU node):
    a run's own cluster takes only the GPUs its ranks leave free, and its pre-start checks say when none are left."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.user_address = any(o.split("=", 1)[0].strip() == "rollout.ray_address" for o in cfg.rl)
        self.per_run = False  # each run starts its own cluster (GPU engines)
        self.address: Optional[str] = None

    def get(self, run_cfgs) -> Optional[str]:
        """The cluster's address, started for the runs' configs (`run_cfgs()`) if it is not up yet; None: each run
        uses the cluster its overrides name, or starts its own."""
        if self.user_address or self.per_run or self.address is not None:
            return self.address
        import os

        import ray

        from megatron_apo.rollout.fleet import init_ray
        from megatron_apo.rollout.placement import node_gpu_count
        from megatron_apo.trainer.lifecycle import signals_blocked

        cfgs = run_cfgs()
        if node_gpu_count() and any(c.rollout.engine == "vllm" for c in cfgs):
            self.per_run = True
            return None
        # one CPU per engine at most (a CPU engine asks for half of one): every run's engines fit, however many
        num_cpus = max(os.cpu_count() or 1, *(c.rollout.num_engines for c in cfgs))
        log(f"starting the study's Ray cluster ({num_cpus} CPUs) for every run")
        # Ray's processes inherit SIGUSR1 blocked (Slurm's time-limit signal; see trainer/controller.py)
        with signals_blocked((signal.SIGUSR1,)):
            init_ray(None, num_cpus=num_cpus)
        self.address = ray.get_runtime_context().gcs_address
        return self.address

    def close(self) -> None:
        if self.address is not None:
            from megatron_apo.rollout.fleet import shutdown_ray

            shutdown_ray()
            self.address = None


def exact_eval(rcfg, checkpoint: str, scratch: Path, label: str, cfg: StudyConfig, path: Path) -> str:
    """Exact pass@k (k = 1..eval_n) of a checkpoint on the run's validation prompts, written to `path` once."""
    from megatron_apo.eval.exact import evaluate_checkpoint_exact
    from megatron_apo.eval.report import write_results
    from megatron_apo.rollout.engine import SamplingParams

    if path.is_file():
        return str(path)
    r = rcfg.rollout
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            max_new_tokens=rcfg.data.max_response_length)
    res = evaluate_checkpoint_exact(checkpoint, rcfg.data.val_files, rcfg.data.tokenizer, params,
                                    list(range(1, cfg.eval_n + 1)), scratch, rcfg.data.max_prompt_length, label=label)
    tmp = path.with_suffix(".tmp")
    write_results(res, tmp)
    tmp.replace(path)
    return str(path)


def run_one(cfg: StudyConfig, paths: dict, ref_ckpt: str, out: Path, method: str, seed: int,
            instance: Optional[int] = None, ray_address: Optional[str] = None) -> dict:
    """Trains one (method, instance, seed) unless it has finished before; returns its done.json. `ray_address`: a
    running Ray cluster for the run's fleet (the study's); without it the run starts a local one of its own."""
    from megatron_apo.config import load_config

    run_dir = run_dir_of(out, method, seed, instance)
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
    rcfg = load_config(None, run_overrides(cfg, paths, ref_ckpt, run_dir, method, seed, ray_address))
    t0 = time.time()
    # a signal to the study reaches the ranks (they stop after their step); if the study dies, they get SIGTERM
    try:
        history, stopped_at = run_distributed(_train_entry, cfg.tp, rcfg, timeout=cfg.run_timeout_s,
                                              forward_signals=(signal.SIGTERM,))[0]
    except RanksStopped:  # the signal came while the ranks were starting: nothing trained, the run starts over
        raise StudyStopped(f"study: stopped by a signal while run {method}/{run_dir.name} was starting; rerun the "
                           "same command to continue (finished runs are kept)") from None
    if stopped_at is not None:
        raise StudyStopped(f"study: stopped by a signal during run {method}/{run_dir.name} (step {stopped_at}); "
                           "rerun the same command to continue (finished runs are kept)")
    t_train = time.time() - t0
    if cfg.eval_mode == "exact":
        base = instance_dir(out, instance)
        initial = exact_eval(rcfg, ref_ckpt, base, "initial", cfg, base / "reference_exact_eval.json")
        final = exact_eval(rcfg, str(run_dir / "checkpoints"), run_dir, method, cfg, run_dir / "exact_eval.json")
    else:
        evals = sorted((run_dir / "eval").glob("step_*.json"))
        if len(evals) < 2:
            raise RuntimeError(f"study: run {method}/{run_dir.name} wrote {len(evals)} eval files in {run_dir}/eval, "
                               "expected the initial and the final one")
        initial, final = str(evals[0]), str(evals[-1])
    record = {"method": method, "seed": seed, "instance": instance, "seconds": time.time() - t0,
              "train_seconds": t_train, "initial_eval": initial, "final_eval": final, "history": history}
    done.write_text(json.dumps(record) + "\n")
    return record


def precondition(cfg: StudyConfig, out: Path) -> None:
    """The mechanism precondition (study/diagnostics.py) on every finished baseline run, cached per run; the
    summary over replicates goes to diagnostics.json in the config's report folder, for its analysis."""
    from megatron_apo.rollout.engine import SamplingParams
    from megatron_apo.study.diagnostics import run_precondition

    per_rep = []
    for instance, seed in replicates(cfg):
        run_dir = run_dir_of(out, cfg.baseline, seed, instance)
        if not (run_dir / "done.json").is_file():
            continue
        cached = run_dir / "precondition.json"
        if not cached.is_file():
            paths = prepare_task(cfg, out, instance) if cfg.task.kind != "files" else prepare_task(cfg, out)
            ref_ckpt = ensure_reference(cfg, paths, instance_dir(out, instance))
            rcfg = _run_config(cfg, paths, ref_ckpt, out, cfg.baseline, seed, instance)
            r = rcfg.rollout
            params = SamplingParams(n=8, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_new_tokens=rcfg.data.max_response_length,
                                    stop_token_ids=tuple(_stop_ids(rcfg.data.tokenizer)), seed=seed)
            stats = run_precondition(str(run_dir / "checkpoints"), ref_ckpt, rcfg.data.val_files, rcfg.data.tokenizer,
                                     params, rcfg.algorithm.apo_topk, run_dir)
            cached.write_text(json.dumps(stats) + "\n")
        per_rep.append(json.loads(cached.read_text()))
    per_rep = [r for r in per_rep if r["num_states"] > 0]
    if per_rep:
        import statistics

        summary = {"replicates": len(per_rep), "num_states": sum(r["num_states"] for r in per_rep),
                   "valid_in_ref_topk_frac": statistics.fmean(r["valid_in_ref_topk_frac"] for r in per_rep),
                   "median_mass_outside_ref_topk": statistics.median(r["median_mass_outside_ref_topk"]
                                                                     for r in per_rep)}
        report = report_dir(cfg, out)
        report.mkdir(parents=True, exist_ok=True)
        (report / "diagnostics.json").write_text(json.dumps({cfg.baseline: summary}, indent=1) + "\n")


def _run_config(cfg: StudyConfig, paths: dict, ref_ckpt: str, out: Path, method: str, seed: int,
                instance: Optional[int]):
    from megatron_apo.config import load_config

    return load_config(None, run_overrides(cfg, paths, ref_ckpt, run_dir_of(out, method, seed, instance), method,
                                           seed))


def _stop_ids(tokenizer_path: str) -> list[int]:
    from megatron_apo.data.tokenizer import load_tokenizer

    return list(load_tokenizer(tokenizer_path).stop_token_ids)


def _pass_summary(path: str, k: int) -> tuple[float, float]:
    res = json.loads(Path(path).read_text())["overall"]
    return res["pass@1"], res.get(f"pass@{k}", float("nan"))


def run_study(cfg: StudyConfig, out: str | Path | None = None) -> dict:
    """The whole study; resumable. Returns the results dict (also written to results.json)."""
    from megatron_apo.study.analysis import analyse, write_report

    out = Path(out or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.json").write_text(json.dumps(as_dict(cfg), indent=1) + "\n")
    t0 = time.time()
    jobs = [(i, s, m) for i, s in replicates(cfg) for m in cfg.methods]  # replicate-major: every method gets one
    done_before = 0
    cluster = StudyRay(cfg)
    try:  # the cluster goes down however the study ends: finished, stopped (StudyStopped, SIGTERM) or failed
        for instance in dict.fromkeys(i for i, _, _ in jobs):
            paths = prepare_task(cfg, out, instance)
            ref_ckpt = ensure_reference(cfg, paths, instance_dir(out, instance))
            for instance_, seed, method in jobs:
                if instance_ != instance:
                    continue
                done_before += 1
                if (run_dir_of(out, method, seed, instance) / "done.json").is_file():
                    continue
                address = cluster.get(lambda: [_run_config(cfg, paths, ref_ckpt, out, m, seed, instance)
                                                for m in cfg.methods])
                where = replicate_name(instance, seed).replace("_", " ")
                log(f"run {done_before}/{len(jobs)}: {method} {where}")
                rec = run_one(cfg, paths, ref_ckpt, out, method, seed, instance, ray_address=address)
                p1, pk = _pass_summary(rec["final_eval"], cfg.eval_n)
                log(f"  {method} {where} done in {rec['seconds']:.0f}s (training {rec['train_seconds']:.0f}s): "
                    f"pass@1 {p1:.3f}, pass@{cfg.eval_n} {pk:.3f}")
    finally:
        cluster.close()
    if cfg.eval_mode == "exact":
        precondition(cfg, out)
    results = analyse(cfg, out)
    report = report_dir(cfg, out)
    report.mkdir(parents=True, exist_ok=True)
    write_report(cfg, results, out, report)
    log(f"done in {(time.time() - t0) / 60:.1f} min; wrote {report}/results.json, report.md, pass_at_k.png, "
        "dynamics.png")
    return results
