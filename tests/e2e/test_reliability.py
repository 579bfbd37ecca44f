"""No silent damage: a full disk, damaged checkpoints, torn metrics, a second trainer in the same out_dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_apo.parallel import run_distributed
from megatron_apo.trainer.metrics import MetricsLogger, read_metrics
from tests.helpers.checkpoint_bodies import resume_newest_intact, save_steps, save_until_error
from tests.helpers.procs import survivors


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB filesystem (tmpfs), so writes fail with ENOSPC as on a full disk; needs root (mount)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_save_says_so_and_leaves_nothing_behind(small_disk):
    ckpt = small_disk / "ckpt"
    err = run_distributed(save_until_error, 1, str(ckpt), 20, timeout=300)[0]
    assert err.startswith("DiskError: checkpoint of step ") and "No space left on device" in err, err
    assert str(ckpt) in err  # names the path
    left = sorted(p.name for p in ckpt.iterdir())
    assert not [n for n in left if ".tmp-" in n], left  # the partial folder was removed
    if (ckpt / "latest").is_file():  # the last complete save is still the one `latest` names, and it is whole
        assert (ckpt / f"iter_{int((ckpt / 'latest').read_text()):07d}" / "checksums.json").is_file()


def test_metrics_on_a_full_disk_keep_whole_lines(small_disk):
    log = MetricsLogger(small_disk, total_steps=10, tensorboard=False, progress=False)
    log.log(1, {"loss": 1.0})
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    for size in (65536, 4096, 1):  # fill the disk to the last byte
        try:
            while True:
                os.write(fd, b"\0" * size)
        except OSError:
            pass
    os.close(fd)
    with pytest.raises(OSError, match="No space left on device"):
        for step in range(2, 200):  # the first record that does not fit raises
            log.log(step, {"loss": float(step), "pad": "x" * 3000})
    log.close()
    text = (small_disk / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    (small_disk / "filler").unlink()
    log = MetricsLogger(small_disk, total_steps=10, tensorboard=False, progress=False)  # the next run appends
    log.log(99, {"loss": 0.5})
    log.close()
    assert read_metrics(small_disk / "metrics.jsonl")[-1]["step"] == 99


def test_a_torn_metrics_line_is_repaired_on_open(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')  # killed mid-record
    assert [r["step"] for r in read_metrics(f)] == [1]  # readable as it is
    log = MetricsLogger(tmp_path, total_steps=3, tensorboard=False, progress=False)
    log.log(2, {"loss": 0.9})
    log.close()
    assert [r["step"] for r in read_metrics(f)] == [1, 2]
    assert len(f.read_text().splitlines()) == 2


@pytest.fixture(scope="module")
def three_saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("saves")
    weights = run_distributed(save_steps, 1, str(root / "ckpt"), [1, 2, 3], timeout=300)[0]
    return root / "ckpt", weights


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_intact_checkpoint_resumes_with_checksums_verified(three_saves):
    ckpt, weights = three_saves
    manifest = json.loads((ckpt / "iter_0000003" / "checksums.json").read_text())
    assert any(n.endswith(".distcp") for n in manifest["files"]) and "megatron_apo.json" in manifest["files"]
    step, extra, w = run_distributed(resume_newest_intact, 1, str(ckpt), timeout=300)[0]
    assert step == 3 and extra == {"step": 3} and _same(w, weights[3])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_latest_names_the_file_and_falls_back(three_saves, tmp_path, capfd, damage):
    ckpt, weights = three_saves
    ckpt = _copy(ckpt, tmp_path / "ckpt")
    victim = sorted((ckpt / "iter_0000003" / "model").glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit, in the middle of the weights
    else:
        data = data[: len(data) // 3]
    victim.write_bytes(bytes(data))
    step, extra, w = run_distributed(resume_newest_intact, 1, str(ckpt), timeout=300)[0]
    assert step == 2 and _same(w, weights[2])  # the newest intact checkpoint, exactly
    out = "".join(capfd.readouterr())  # the warning is a log line (stderr)
    assert str(victim) in out and "resuming from the newest intact checkpoint, iter_0000002" in out, out


@pytest.mark.slow
def test_every_checkpoint_damaged_is_one_clear_error(three_saves, tmp_path):
    ckpt = _copy(three_saves[0], tmp_path / "ckpt")
    for it in ckpt.glob("iter_*"):
        victim = sorted((it / "optim").glob("*.distcp"))[0]
        victim.write_bytes(victim.read_bytes()[:100])
    err = run_distributed(resume_newest_intact, 1, str(ckpt), timeout=300)[0][0]
    assert err.startswith("CheckpointCorrupt: no intact checkpoint in") and "checkpoint.resume=false" in err, err


@pytest.mark.slow
def test_convert_refuses_a_flipped_byte(three_saves, tmp_path):
    ckpt = _copy(three_saves[0] / "iter_0000003", tmp_path / "it")
    victim = sorted((ckpt / "model").glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x80
    victim.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "convert", "megatron-to-hf", "--megatron", str(ckpt),
                        "--out", str(tmp_path / "hf"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and str(victim) in r.stderr and "CRC32" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_stale_tmp_folders_removed_and_out_dir_locked(tmp_path):
    from megatron_apo.trainer.runlock import OutDirLocked, check_out_dir_free, claim_run_dirs

    ckpt = tmp_path / "checkpoints"
    (ckpt / "iter_0000004.tmp-12345" / "model").mkdir(parents=True)
    (ckpt / ".latest.tmp-12345").write_text("4\n")
    (ckpt / "iter_0000002").mkdir()
    lock = claim_run_dirs(tmp_path, ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002"]
    with pytest.raises(OutDirLocked, match=f"{tmp_path} is in use by another trainer \\(pid {os.getpid()} on "):
        check_out_dir_free(tmp_path)
    lock.release()
    check_out_dir_free(tmp_path)
    # a holder that dies (even by SIGKILL) leaves a lock file behind, which the next trainer takes over
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from megatron_apo.trainer.runlock import "
                               "OutDirLock; OutDirLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(600)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutDirLocked, match=f"pid {holder.pid}"):
        check_out_dir_free(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / ".megatron-apo.lock").is_file()
    claim_run_dirs(tmp_path, ckpt).release()


def _one_line_error(args: list[str], code: int = 2) -> str:
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == code, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_hf_export_checksums_catch_a_flipped_byte(three_saves, tmp_path):
    """megatron-to-hf records CRC32s of its safetensors shards; hf-to-megatron refuses a shard with a flipped byte."""
    hf = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "megatron_apo.cli", "convert", "megatron-to-hf", "--megatron",
                    str(three_saves[0]), "--out", str(hf), "--quiet"], check=True, capture_output=True, timeout=300)
    shard = sorted(hf.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x04
    shard.write_bytes(bytes(data))
    err = _one_line_error(["convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "m"), "--quiet"])
    assert str(shard) in err and "CRC32" in err, err


def test_corrupt_safetensors_header_names_the_file(tmp_path):
    import struct

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    raw = b"\xff\xfe{not a header"
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    err = _one_line_error(["convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "m"), "--quiet"])
    assert str(hf / "model.safetensors") in err and "corrupt safetensors header" in err, err


def test_truncated_metadata_is_one_line(three_saves, tmp_path):
    it = _copy(three_saves[0] / "iter_0000003", tmp_path / "it")
    (it / "checksums.json").unlink()  # a checkpoint without checksums: the .metadata reader itself must say it
    md = it / "model" / ".metadata"
    md.write_bytes(md.read_bytes()[:50])
    args = ["convert", "megatron-to-hf", "--megatron", str(it), "--out", str(tmp_path / "hf"), "--quiet"]
    assert "has no checksums.json" in _one_line_error(args)  # unverifiable: refused unless the user allows it
    err = _one_line_error(args + ["--allow-unverified"])
    assert f"{md} is damaged or truncated" in err, err


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "LIST"], "the top level must be a mapping of sections"),
    (["plan", "--model", "BADYAML", "--gpus", "8"], "not valid YAML"),
    (["demo", "--out", "FILE"], "is an existing file"),
    (["demo", "--out", "DIR", "--rl-steps", "-1"], "--rl-steps must be >= 1"),
])
def test_cli_mistakes_are_one_line(tmp_path, args, message):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("num_layers: [\n")
    (tmp_path / "file").write_text("x")
    subst = {"LIST": str(tmp_path / "list.yaml"), "BADYAML": str(tmp_path / "bad.yaml"), "FILE": str(tmp_path / "file"),
             "DIR": str(tmp_path / "demo")}
    assert message in _one_line_error([subst.get(a, a) for a in args])
    assert not (tmp_path / "demo").exists()


def test_eval_error_leaves_no_empty_out_folder(tmp_path):
    _one_line_error(["eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "x.parquet"),
                     "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_stop_signal_while_the_ranks_start_is_ranks_stopped_not_a_failure(tmp_path):
    """SIGTERM forwarded before a rank installed a handler of its own kills it: that is a stop (RanksStopped, which
    `train` turns into exit 75 and `study` into StudyStopped), not a DistributedError traceback."""
    script = ("import os, signal, threading, time\nfrom megatron_apo.parallel import RanksStopped, run_distributed\n"
              "if __name__ == '__main__':\n"
              "    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
              "    try:\n"
              "        run_distributed(time.sleep, 2, 600, timeout=120, forward_signals=(signal.SIGTERM,))\n"
              "    except RanksStopped as e:\n"
              "        print('stopped', e.signum, str(e).splitlines()[0])\n")
    (tmp_path / "launcher.py").write_text(script)
    r = subprocess.run([sys.executable, str(tmp_path / "launcher.py")], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"stopped {int(signal.SIGTERM)} sleep: stopped by SIGTERM" in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.slow
def test_ranks_do_not_outlive_a_killed_launcher(tmp_path):
    """The launcher's ranks get SIGTERM from the kernel when it dies, even by SIGKILL (no orphans training on)."""
    script = ("import signal, time\nfrom megatron_apo.parallel import run_distributed\n"
              "if __name__ == '__main__':\n"
              "    run_distributed(time.sleep, 2, 600, timeout=900, "
              "forward_signals=(signal.SIGTERM, signal.SIGUSR1))\n")
    (tmp_path / "launcher.py").write_text(script)
    p = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py")])
    deadline = time.time() + 120
    children: list[str] = []
    while time.time() < deadline and len(children) < 2:
        children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        time.sleep(0.2)
    time.sleep(2)  # the ranks are past start-up (prctl done)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2, children
    p.kill()
    p.wait()
    left = survivors(children, grace_s=30)
    assert not left, f"ranks {left} outlived the launcher"


# ------------------------------------------------------------------------------------------- a checkpoint is data

class _Planted:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _recompute_manifest(it: Path) -> None:
    from megatron_apo.models.checksums import checksum_files

    sums = {n: c for n, c in checksum_files(it, collective=False).items() if n != "checksums.json"}
    (it / "checksums.json").write_text(json.dumps({"algorithm": "crc32", "files": sums}))


@pytest.mark.slow
@pytest.mark.parametrize("manifest", ["recomputed", "deleted", "deleted+allowed"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(three_saves, tmp_path, manifest):
    import torch

    ckpt = _copy(three_saves[0], tmp_path / "ckpt")
    it = ckpt / "iter_0000003"
    marker = tmp_path / "pwned"
    (it / "extra.json").unlink()  # an older version's extra.pt takes its place
    torch.save({"controller": _Planted(marker)}, it / "extra.pt")
    torch.save(_Planted(marker), it / "rng" / "rank_00000.pt")
    if manifest == "recomputed":  # whoever planted it covered their tracks
        _recompute_manifest(it)
    else:
        (it / "checksums.json").unlink()
    got = run_distributed(resume_newest_intact, 1, str(ckpt), manifest == "deleted+allowed", timeout=300)[0]
    assert not marker.exists()  # nothing was unpickled beyond tensors and plain data
    if manifest == "deleted":
        assert got[0].startswith("UnverifiedCheckpoint: ") and "checkpoint.allow_unverified=true" in got[0], got
    else:  # loaded with weights_only=True: the planted objects are refused, the weights are the saved ones
        assert got[0] == 3 and _same(got[2], three_saves[1][3]), got[0]


@pytest.mark.slow
def test_a_planted_metadata_is_refused_before_it_is_read(three_saves, tmp_path):
    import pickle

    it = _copy(three_saves[0] / "iter_0000003", tmp_path / "it")
    marker = tmp_path / "pwned"
    (it / "model" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))  # torch's reader would pickle.load it
    for args in (["--out", str(tmp_path / "hf"), "--quiet"], ["--verify-only"]):
        err = _one_line_error(["convert", "megatron-to-hf", "--megatron", str(it), *args])
        assert f"{it / 'model' / '.metadata'} is damaged (its CRC32 differs" in err, err
        assert not marker.exists() and not (tmp_path / "hf").exists()
    # a file the save never wrote is refused too (a manifest cannot vouch for it)
    (it / "model" / ".metadata").write_bytes((three_saves[0] / "iter_0000003" / "model" / ".metadata").read_bytes())
    (it / "model" / "extra.distcp").write_bytes(pickle.dumps(_Planted(marker)))
    err = _one_line_error(["convert", "megatron-to-hf", "--megatron", str(it), "--verify-only"])
    assert "extra.distcp is not in checksums.json" in err, err
    (it / "model" / "extra.distcp").unlink()
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "convert", "megatron-to-hf", "--megatron", str(it),
                        "--verify-only"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all" in r.stdout and "match checksums.json" in r.stdout, r.stdout + r.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_disk_full_during_the_hf_export_is_one_line_and_leaves_nothing(three_saves, small_disk):
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"\0" * ((3 << 20) - (400 << 10)))  # about 400 KiB left
    except OSError:
        pass
    os.close(fd)
    err = _one_line_error(["convert", "megatron-to-hf", "--megatron", str(three_saves[0]), "--out",
                           str(small_disk / "hf"), "--quiet"])
    assert "No space left on device" in err and str(small_disk / "hf") in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no output, no temporary folder


@pytest.fixture(scope="module")
def saved_at_tp2(tmp_path_factory):
    from tests.helpers.checkpoint_bodies import train_save_or_resume

    ckpt = str(tmp_path_factory.mktemp("tp2") / "ckpt")
    run_distributed(train_save_or_resume, 2, 2, ckpt, True, timeout=300)
    return ckpt


@pytest.mark.slow
def test_resume_at_another_tp_size_is_one_line_or_resets_adam_when_allowed(saved_at_tp2, tmp_path):
    from tests.helpers.checkpoint_bodies import resume_at_layout

    err = run_distributed(resume_at_layout, 1, 1, 1, saved_at_tp2, False, timeout=300)[0]
    assert err.startswith("OptimizerLayoutChanged: ") and "tensor 2 -> 1" in err, err
    assert "checkpoint.reset_optimizer=true" in err and len(err.splitlines()) == 1, err
    step, losses = run_distributed(resume_at_layout, 1, 1, 1, saved_at_tp2, True, timeout=300)[0]
    assert step == 2 and all(np.isfinite(losses))
    err = run_distributed(resume_at_layout, 2, 1, 2, saved_at_tp2, False, timeout=300)[0]  # a PP change too
    assert err.startswith("OptimizerLayoutChanged: ") and "tensor 2 -> 1, pipeline 1 -> 2" in err, err
    last_stage = run_distributed(resume_at_layout, 2, 1, 2, saved_at_tp2, True, timeout=300)[1]
    assert last_stage[0] == 2 and last_stage[1] and all(np.isfinite(last_stage[1]))
    # a checkpoint of an older version records no layout: megatron-core's KeyError becomes the same one line
    old = _copy(Path(saved_at_tp2), tmp_path / "old")
    meta_file = old / "iter_0000002" / "megatron_apo.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "parallel"}))
    _recompute_manifest(old / "iter_0000002")
    err = run_distributed(resume_at_layout, 1, 1, 1, str(old), False, timeout=300)[0]
    assert err.startswith("OptimizerLayoutChanged: ") and "does not fit this parallel layout" in err, err
    assert "checkpoint.reset_optimizer=true" in err and len(err.splitlines()) == 1, err


def _train_history(cfg):
    from megatron_apo.trainer.train import train

    return train(cfg).history


@pytest.mark.slow
def test_resume_guards_the_config_and_replays_a_lost_metrics_record(tmp_path):
    """Run 2 steps; drop step 2's metrics line (a kill between the checkpoint's rename and the metrics write);
    a resume with another lr is refused naming it; the resume with the same config restores step 2's record."""
    from megatron_apo.config import ConfigError, load_config
    from tests.helpers.rl_setup import overrides, toy_env

    env = toy_env(tmp_path / "toy")
    out = tmp_path / "run"
    args = lambda steps, *extra: overrides(env, out, tp=1, steps=steps,  # noqa: E731
                                           extra=["checkpoint.save_interval=1", "trainer.tensorboard=false", *extra])
    run_distributed(_train_history, 1, load_config(None, args(2)), timeout=400)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    metrics.write_text(lines[0] + "\n")
    saved = json.loads((out / "checkpoints" / "iter_0000002" / "megatron_apo.json").read_text())
    assert saved["run_config"]["trainer"]["lr"] == 1e-3 and len(saved["config_fingerprint"]) == 64
    with pytest.raises(ConfigError, match=r"trainer.lr: 0.001 -> 0.002.*checkpoint.allow_config_change=true"):
        run_distributed(_train_history, 1, load_config(None, args(3, "trainer.lr=2e-3")), timeout=400)
    history = run_distributed(_train_history, 1, load_config(None, args(3)), timeout=400)[0]
    assert [h["step"] for h in history] == [3]
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == json.loads(lines[1])["loss"]


def test_a_validation_failure_leaves_no_lock_behind(tmp_path):
    """preflight checks that no trainer holds out_dir before it reads the data; that check must create nothing."""
    from tests.helpers.rl_setup import overrides

    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    env = {"model": "tiny", "train": str(bad), "tokenizer": str(tmp_path / "tok.model")}
    (tmp_path / "tok.model").write_text("x")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train", *overrides(env, out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert not out.exists(), sorted(p.name for p in out.iterdir())
