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
    err = _one_line_error(["convert", "megatron-to-hf", "--megatron", str(it), "--out", str(tmp_path / "hf"),
                           "--quiet"])
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
