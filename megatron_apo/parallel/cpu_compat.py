"""Every workaround megatron-core needs to run without CUDA, in one place.

`apply()` is a no-op when CUDA is available, so GPU runs execute megatron-core untouched.
Nothing else in megatron-apo may special-case the CPU for Megatron's sake: add the shim here,
with a one-line reason, instead.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False

# Megatron-core flags whose fused kernels exist only on CUDA; TransformerConfig must disable them. With CUDA
# models.builder.fusion_flags turns on bias-activation, bias-dropout, RoPE and gradient-accumulation fusion
# (model.fusions); masked-softmax fusion and the persistent LayerNorm are apex kernels the image does not have.
CPU_TRANSFORMER_CONFIG_OVERRIDES = dict(
    use_cpu_initialization=True,  # weights are created on the host, never moved to a GPU
    gradient_accumulation_fusion=False,  # fused wgrad accumulation is an apex/CUDA kernel
    bias_activation_fusion=False,  # jit-fused bias+GeLU/SwiGLU targets CUDA
    masked_softmax_fusion=False,  # fused softmax is a CUDA extension
    persist_layer_norm=False,  # apex persistent LayerNorm is CUDA-only
    apply_rope_fusion=False,  # fused RoPE is a CUDA kernel
    bias_dropout_fusion=False,  # jit-fused bias-dropout-add targets CUDA
)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def transformer_config_overrides() -> dict:
    """TransformerConfig keyword overrides needed on this machine (empty with CUDA)."""
    return {} if cuda_available() else dict(CPU_TRANSFORMER_CONFIG_OVERRIDES)


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare int is a CUDA ordinal in torch's factory functions
    return torch.device(device).type == "cuda"


class _CudaFactoryToCPU(TorchFunctionMode):
    """Maps `device="cuda"` / `device=<int>` in tensor factories and `.to()`/`.cuda()` to the CPU.

    Reason: megatron's pipeline schedules and p2p code create tensors with a hard-coded CUDA device,
    and its optimizers check `tensor.type()` against CUDA type names.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers dispatch on param.type() strings naming CUDA tensors.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device_like(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def _is_cuda_device_like(x) -> bool:
    if isinstance(x, (str, torch.device)):
        return _is_cuda_device(x)
    return False


_MODE: _CudaFactoryToCPU | None = None


def apply() -> None:
    """Install the CPU shims (idempotent; does nothing when CUDA is available)."""
    global _APPLIED, _MODE
    if _APPLIED or cuda_available():
        return
    # megatron asks torch.cuda for the "current device" to place buffers; on CPU that is the host.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # megatron synchronizes streams around timers and p2p; there are no streams on CPU.
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron seeds the CUDA generator; the host generator is the one that matters on CPU.
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    # hard-coded device="cuda" tensor factories in the pipeline schedules go to the host instead.
    _MODE = _CudaFactoryToCPU()
    _MODE.__enter__()
    _patch_streams()
    _patch_moe_router_gemm()
    _patch_moe_split_sizes()
    _patch_uneven_sequence_parallel_collectives()
    _patch_torch_norm_sequence_parallel()
    _patch_grad_clipping()
    _patch_recompute_rng_snapshot()
    _APPLIED = True


def rng_tracker_kwargs() -> dict:
    """Arguments for megatron's `model_parallel_cuda_manual_seed` on this machine.

    Reason: the default tracker snapshots CUDA RNG states; the inference tracker does not.
    """
    return {} if cuda_available() else {"inference_rng_tracker": True}


def _patch_recompute_rng_snapshot() -> None:
    """Full recompute (`trainer.recompute=full`) on the host.

    Megatron snapshots the CPU and the CUDA RNG state before each layer and restores both before recomputing it.
    On the host the CPU generator is the only one and megatron snapshots it already (`torch.get_rng_state`), so
    the CUDA part is an empty placeholder that restores nothing. The recomputation runs inside backward, which
    torch dispatches through the factory mode with that mode popped: the recomputed layer (its `device="cuda"`
    causal mask) needs the mode pushed again."""
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    recompute_backward = tp_random.CheckpointFunction.backward

    def backward_with_host_factories(ctx, *grads):
        with _MODE:
            return recompute_backward(ctx, *grads)

    tp_random.CheckpointFunction.backward = staticmethod(backward_with_host_factories)


class _HostEvent:
    """A CUDA event stand-in: host work is already complete when it is recorded."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def record(self, stream=None) -> None:
        pass


class _HostStream:
    """A CUDA stream stand-in: the host runs everything in program order on one 'stream'.

    A class (not a factory function): libraries annotate with `torch.cuda.Stream | None`.
    """

    _one: "_HostStream | None" = None

    def __new__(cls, *args, **kwargs):
        if cls._one is None:
            cls._one = super().__new__(cls)
        return cls._one  # one stream: the current one (so no side-stream sync)

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _HostEvent:
        return event or _HostEvent()

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def _patch_streams() -> None:
    """Reason: the MoE all-to-all dispatcher copies routing metadata on a side CUDA stream and syncs on its event."""
    import contextlib

    torch.cuda.Stream = _HostStream
    torch.cuda.Event = _HostEvent
    torch.cuda.current_stream = lambda *a, **k: _HOST_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _patch_moe_router_gemm() -> None:
    """Reason: megatron-core 0.16 router gating tests `te_general_gemm is not None`, a name defined only with TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # the torch.mm path


def _patch_moe_split_sizes() -> None:
    """Reason: the all-to-all dispatcher turns its split sizes into numpy only when they are CUDA tensors;
    host tensors would reach `all_to_all_single`, which takes a list of ints."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_sequence_parallel_collectives() -> None:
    """Reason: gloo's all_gather / reduce_scatter need equal sizes, and the MoE dispatcher at TP > 1 gathers
    and reduce-scatters uneven token counts; both are all-to-alls with split sizes, which gloo has."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        world, sizes = group.size(), [int(n) for n in output_split_sizes]
        output = input_.new_empty([sum(sizes)] + list(input_.shape[1:]))
        send = input_.contiguous().repeat(world, *([1] * (input_.dim() - 1)))  # my rows to every rank
        dist.all_to_all_single(output, send, output_split_sizes=sizes, input_split_sizes=[input_.shape[0]] * world,
                               group=group)
        return output

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        world, sizes = group.size(), [int(n) for n in input_split_sizes]
        mine = sizes[group.rank()]
        parts = input_.new_empty([world * mine] + list(input_.shape[1:]))  # every rank's rows for me
        dist.all_to_all_single(parts, input_.contiguous(), output_split_sizes=[mine] * world,
                               input_split_sizes=sizes, group=group)
        return parts.view(world, mine, *input_.shape[1:]).sum(0)

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


def _patch_torch_norm_sequence_parallel() -> None:
    """Reason: MoE at TP > 1 must train with sequence parallelism, and the local spec's torch norm refuses it.

    A per-token norm is unchanged by splitting the sequence; its weight gradient is then partial on each
    TP rank, so the weight is tagged `sequence_parallel` and megatron's finalize_model_grads sums it over TP
    (exactly what Transformer Engine's norm does on GPU).
    """
    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    class _WithoutSP:  # the config as the norm's checks should see it
        def __init__(self, config):
            self._config = config

        def __getattr__(self, name):
            return False if name == "sequence_parallel" else getattr(self._config, name)

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, *args, **kwargs)
        norm = original(cls, _WithoutSP(config), *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


def _patch_grad_clipping() -> None:
    """Reason: megatron's grad-norm helpers assert CUDA tensors and use a CUDA multi-tensor kernel."""
    from megatron.core.optimizer import clip_grads

    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        # the group megatron passes (model-parallel, or the whole world with the distributed optimizer)
        # holds the other pieces of the gradient: sum the squares (max for inf) over it, as megatron does
        if isinstance(grads_for_norm, torch.Tensor):
            grads_for_norm = [grads_for_norm]
        norm_type = float(norm_type)
        if norm_type == float("inf"):
            total = max((g.abs().max().float() for g in grads_for_norm), default=torch.tensor(0.0))
            total = torch.as_tensor(total, dtype=torch.float32).reshape(1)
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX, group=grad_stats_parallel_group)
            return total.item()
        total = torch.zeros(1, dtype=torch.float32)
        for g in grads_for_norm:
            total += torch.linalg.vector_norm(g.float(), norm_type) ** norm_type
        torch.distributed.all_reduce(total, group=grad_stats_parallel_group)
        return total.item() ** (1.0 / norm_type)

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = []
        for p in parameters:
            g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
            if g is not None:
                grads.append(g)
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for g in grads:
                g.mul_(coeff)

    clip_grads.get_grad_norm_fp32 = get_grad_norm_fp32
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    # optimizer modules import these names directly; rebind where they were imported.
    import sys

    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core.optimizer") and mod is not None:
            if getattr(mod, "get_grad_norm_fp32", None) is not None:
                mod.get_grad_norm_fp32 = get_grad_norm_fp32
            if getattr(mod, "clip_grad_by_total_norm_fp32", None) is not None:
                mod.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32

