"""megatron_apo.rewards"""
