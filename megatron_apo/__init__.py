"""megatron-apo: Anchored Policy Optimization (APO) and RLVR baselines on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Without CUDA, megatron-core warns at import that Apex / Transformer Engine are absent: expected on CPU.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
