"""megatron_apo.algorithms"""
