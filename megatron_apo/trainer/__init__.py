"""The RL trainer: reference model, the APO/GRPO step on Megatron-Core, checkpointing, metrics."""
