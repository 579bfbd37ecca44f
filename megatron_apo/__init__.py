"""megatron-apo: Anchored Policy Optimization (APO) and RLVR baselines on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Without CUDA, megatron-core warns at import that Apex / Transformer Engine are absent: expected on CPU.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
# Deprecations inside megatron-core 0.16 / torch 2.13 that a user cannot act on (megatron-core's own calls):
# its reduce-scatter/all-gather and checkpoint-loading APIs, and dist_checkpointing's ShardedTensor.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`load_state_dict` is deprecated and will be removed")
warnings.filterwarnings("ignore", category=FutureWarning, message=r"Please use DTensor instead and we are deprecating")
# The DistributedOptimizer reads `.grad` of its fp32 main params, which on CPU (no separate master copy) are views of
# the model params; the gradient it needs is copied in explicitly, so the non-leaf `.grad` read is harmless.
warnings.filterwarnings("ignore", category=UserWarning,
                        message=r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed")
