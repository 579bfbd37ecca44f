"""megatron-core's fused kernels (`model.fusions`, docs/gpu.md "Fused kernels"): on with CUDA where the kernel
exists, off without CUDA and with `model.fusions: false`. The CUDA side is the flag logic (no GPU here); the
flag set it produces for our SwiGLU model is checked to pass megatron-core's own TransformerConfig validation."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_apo.config import load_config
from megatron_apo.models import load_model_config
from megatron_apo.models.builder import fusion_flags, transformer_config

FLAGS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion")
ALL_OFF = dict.fromkeys(FLAGS, False)


@pytest.mark.parametrize("fused_rope,wgrad_kernel,ddp,want_rope,want_wgrad", [
    (True, True, True, True, True),      # TE and apex's wgrad kernel, a DDP-wrapped model: everything on
    (True, False, True, True, False),    # no apex (the image): megatron's output layer has no wgrad kernel
    (True, True, False, True, False),    # not DDP-wrapped (reference model, raw modules): no main_grad to fuse into
    (False, True, True, False, True),    # no TE: no fused RoPE kernel
])
def test_with_cuda(fused_rope, wgrad_kernel, ddp, want_rope, want_wgrad):
    got = fusion_flags(True, ddp, cuda=True, fused_rope=fused_rope, wgrad_kernel=wgrad_kernel)
    assert got == dict(bias_activation_fusion=True, bias_dropout_fusion=True, apply_rope_fusion=want_rope,
                       gradient_accumulation_fusion=want_wgrad)


def test_fusions_false_and_no_cuda_turn_everything_off():
    assert fusion_flags(False, True, cuda=True, fused_rope=True, wgrad_kernel=True) == ALL_OFF
    assert fusion_flags(True, True, cuda=False, fused_rope=True, wgrad_kernel=True) == ALL_OFF


def test_transformer_config_on_this_machine_keeps_them_off():
    cfg = load_model_config("tiny")
    for fusions in (True, False):
        tc = transformer_config(cfg, tensor_parallel_size=1, pipeline_parallel_size=1, expert_parallel_size=1,
                                transformer_impl="local", fusions=fusions, ddp=True)
        assert {f: getattr(tc, f) for f in FLAGS} == ALL_OFF


def test_the_cuda_flag_set_passes_megatron_validation():
    """Bias-activation fusion is valid for our activation (SwiGLU without bias); megatron-core checks it."""
    tc = transformer_config(load_model_config("tiny"), tensor_parallel_size=1, pipeline_parallel_size=1,
                            expert_parallel_size=1, transformer_impl="local")
    fields = {f.name for f in dataclasses.fields(tc) if f.init}
    kwargs = {k: v for k, v in vars(tc).items() if k in fields}
    cuda_flags = fusion_flags(True, False, cuda=True, fused_rope=False, wgrad_kernel=False)
    fused = type(tc)(**{**kwargs, **cuda_flags})
    assert fused.bias_activation_fusion and fused.bias_dropout_fusion


def test_model_fusions_key():
    assert load_config(None).model.fusions is True
    assert load_config(None, ["model.fusions=false"]).model.fusions is False
