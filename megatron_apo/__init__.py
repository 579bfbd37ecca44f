"""megatron-apo: Anchored Policy Optimization (APO) and RLVR baselines on Megatron-Core."""

__version__ = "0.1.0"

from megatron_apo.parallel.cpu_compat import quiet_missing_cuda_extension_warnings as _quiet

_quiet()
