"""megatron_apo.data"""
