"""megatron_apo.eval"""
