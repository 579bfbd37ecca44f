"""megatron_apo.ops"""
