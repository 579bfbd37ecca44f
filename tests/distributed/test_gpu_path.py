"""The GPU path's rules, checked on CPU where the logic allows (docs/gpu.md).

Device helper, the gloo control plane and its timeout, host-only conversion ranks, transformer_impl,
cross-spec (Transformer Engine <-> local) checkpoints, the rendezvous address, the sync dtype, and
scripts/gpu_check.sh on a machine without a GPU. The CUDA halves are in tests/distributed/test_gpu_cuda.py.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_apo.config import RolloutSection, RunConfig
from megatron_apo.parallel import run_distributed
from tests.helpers import gpu_path_bodies as bodies

REPO = Path(__file__).resolve().parents[2]


def test_to_device_moves_every_tensor_in_place():
    from megatron_apo.parallel.devices import model_device, to_device

    batch = {"tokens": torch.ones(2, 3, dtype=torch.long), "advantages": torch.zeros(2, 3), "note": "kept"}
    same = to_device(batch, "meta")
    assert same is batch  # moved in place: the reference, old and train passes reuse one moved micro-batch
    assert ({k: v.device.type for k, v in batch.items() if torch.is_tensor(v)}
            == {"tokens": "meta", "advantages": "meta"})
    assert batch["note"] == "kept" and batch["tokens"].dtype == torch.long
    assert model_device(torch.nn.Linear(2, 2).to("meta")).type == "meta"
    assert model_device(torch.nn.Identity()).type == "cpu"


def test_schedule_moves_each_micro_batch_once_in_place():
    """The one call site: the forward step hands every micro-batch dict to the device helper with the model's
    device, and the loss function's writes land in the caller's dicts."""
    out = run_distributed(bodies.schedule_device_body, 1, timeout=180)[0]
    assert out["calls"] == [(i, "cpu") for i in out["ids"]] and out["seen"]


@pytest.mark.slow
def test_control_plane_outlives_the_default_group_timeout():
    """Rank 0 alone for 16 s; the default group's timeout is 9.6 s: the control plane (gloo, 1 min) waits it
    out, the default group does not."""
    out = run_distributed(bodies.control_plane_body, 2, 16.0, timeout=240)
    for r in out:
        assert r["backend"] == "gloo" and r["timeout"] == 1
        assert r["got"] == {"batch": "from rank 0"}
        assert r["any"] is True and r["none"] is False
        assert r["finite"] is False and r["finite_all"] is True
        assert r["mean"] == {"loss": 3.0}  # only rank 1 reports (a last stage): mean of 2 and 4
    assert out[1]["default_group"].startswith("timed out"), out[1]


def test_host_only_ranks_never_see_a_gpu():
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    out = run_distributed(bodies.host_only_body, 2, host_only=True, timeout=120)
    assert [r["visible"] for r in out] == ["", ""] and not any(r["cuda"] for r in out)
    assert [r["backend"] for r in out] == ["gloo", "gloo"] and [r["local_rank"] for r in out] == ["0", "1"]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # the parent's environment is restored


def test_conversion_runs_host_only():
    import inspect

    from megatron_apo.models import convert

    src = inspect.getsource(convert.convert_hf_to_megatron)
    assert "host_only=True" in src
    assert 'backend="gloo"' in inspect.getsource(convert._hf_to_megatron_rank)


def test_transformer_impl_is_explicit(monkeypatch):
    from megatron_apo.models.builder import TransformerEngineMissing, resolve_transformer_impl

    assert resolve_transformer_impl(None) == "local"  # no CUDA here
    assert resolve_transformer_impl("local") == "local"
    with pytest.raises(TransformerEngineMissing, match="needs CUDA.*model.transformer_impl=local"):
        resolve_transformer_impl("transformer_engine")
    with pytest.raises(ValueError, match="unknown"):
        resolve_transformer_impl("apex")
    # a GPU process without Transformer Engine: one clear line, never a silent local-spec fallback
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine is installed here")
    except ImportError:
        pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TransformerEngineMissing) as e:
        resolve_transformer_impl(None)
    msg = str(e.value)
    assert "\n" not in msg and "the default with CUDA" in msg and "pip install -e '.[gpu]'" in msg


def test_run_config_checks_the_new_settings():
    from megatron_apo.trainer.validation import validate_run_config

    for section, key, value, message in [("model", "transformer_impl", "te", "transformer_impl"),
                                         ("rollout", "sync_dtype", "int8", "sync_dtype"),
                                         ("parallel", "control_timeout_minutes", 0, "control_timeout_minutes")]:
        cfg = RunConfig()
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(ValueError, match=message):
            validate_run_config(cfg)


@pytest.mark.slow
def test_checkpoints_load_across_layer_specs(tmp_path):
    out = run_distributed(bodies.spec_interchange_body, 1, str(tmp_path), timeout=300)[0]
    # TE's attention and norm FP8 metadata: absent from a local-spec checkpoint, left at the fresh default
    assert out["dropped"] == ["decoder.final_layernorm._extra_state", "self_attention.core_attention._extra_state"]
    assert out["num_dropped"] == out["num_layers"] + 1
    assert out["te_norm_count"] == 2 * out["num_layers"] and out["te_norms_equal"] and out["all_equal"]
    assert out["old_has_local_names"] and out["old_into_te_equal"] and out["old_into_local_equal"]
    assert out["stored_te_names"] and out["stored_extra_state"]
    assert out["fresh_differs"] and out["loaded_equal"]
    assert "input_layernorm.weight" in out["reader_names"] and "pre_mlp_layernorm.weight" in out["reader_names"]
    assert not any("layer_norm_weight" in n for n in out["reader_names"]) and out["reader_equal"]
    assert out["missing"] != "loaded" and "linear_fc2" in out["missing"], out["missing"]


def test_spellings():
    from megatron_apo.models.spec_interchange import local_spelling, other_spelling, te_spelling

    te = "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert local_spelling(te) == "decoder.layers.3.input_layernorm.weight"
    assert te_spelling(local_spelling(te)) == te and other_spelling(te) == local_spelling(te)
    assert (other_spelling("decoder.layers.pre_mlp_layernorm.weight")
            == "decoder.layers.mlp.linear_fc1.layer_norm_weight")
    assert other_spelling("decoder.final_layernorm.weight") is None  # both specs spell it alike


def test_rendezvous_host_is_routable_by_default():
    from megatron_apo.rollout.sync_group import SyncEndpoint, rendezvous_host

    assert rendezvous_host("10.1.2.3") == "10.1.2.3"
    host = rendezvous_host()
    with socket.socket() as s:
        s.bind((host, 0))  # an address of this host
    ep = SyncEndpoint.new(2, "gloo")
    assert ep.host == host
    if host == "127.0.0.1":
        pytest.skip("this machine has no network route: loopback is all there is")


def test_sync_dtype_defaults_to_the_engine_dtype():
    from megatron_apo.rollout.weight_sync import sync_dtype

    assert sync_dtype(RolloutSection(engine="vllm")) == torch.bfloat16
    assert sync_dtype(RolloutSection(engine="cpu")) == torch.float32
    assert sync_dtype(RolloutSection(engine="vllm", sync_dtype="float32")) == torch.float32
    assert sync_dtype(RolloutSection(engine="cpu", sync_dtype="bf16")) == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sender_sends_the_sync_dtype(dtype):
    out = run_distributed(bodies.sync_dtype_body, 1, dtype, timeout=180)[0]
    assert out["ok"] and out["equal"] and out["dtypes"] == [f"torch.{dtype}"]


@pytest.mark.parametrize("args", [[], ["--wheels", "gpu_wheels"]])
def test_gpu_check_without_a_gpu_says_so_and_exits_0(args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0 and not r.stderr, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU"), r.stdout


def test_gpu_check_refuses_an_unknown_argument():
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--wheel", "x"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "unknown argument '--wheel'" in r.stderr


def _wheel(folder: Path, name: str) -> Path:
    """A minimal valid wheel holding one module `name`."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}.py": "VALUE = 1\n", f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
             "Version: 1.0\n", f"{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
             "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{p},sha256={digest(t)},{len(t)}\n" for p, t in files.items())
    record += f"{name}-1.0.dist-info/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, t in {**files, f"{name}-1.0.dist-info/RECORD": record}.items():
            z.writestr(p, t)
    return path


@pytest.mark.slow
def test_gpu_check_wheels_flow_with_a_stand_in_gpu(tmp_path):
    """The --wheels path up to the GPU work, on CPU: a stand-in `nvidia-smi` lists one GPU, so the script installs
    the folder's wheels into its private site, prints the versions line, runs the gpu tests (skipped: no CUDA)
    and the bench (no CUDA), and prints one line per item."""
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text('#!/bin/sh\nif [ "$1" = "-L" ]; then echo "GPU 0: Stand-in"; else echo Stand-in; fi\n')
    smi.chmod(0o755)
    (tmp_path / "wheels").mkdir()
    _wheel(tmp_path / "wheels", "apo_probe_pkg")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", PYTHON=sys.executable,
               GPU_CHECK_OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--wheels", str(tmp_path / "wheels")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "out" / "site" / "apo_probe_pkg.py").exists()
    assert "versions: python" in r.stdout and "megatron-core 0.16.1" in r.stdout
    for item in ("TP=1 Megatron LM smoke in bf16", "one RL step per loss mode", "vocab-parallel ops vs dense",
                 "checkpoint save -> load -> equal", "NCCL trainer -> vLLM weight sync (2 GPUs)"):
        assert any(ln.startswith(item) and "SKIP (" in ln for ln in r.stdout.splitlines()), (item, r.stdout)
    assert "bench/gpu_step.py" in r.stdout and "SKIP (no CUDA)" in r.stdout
