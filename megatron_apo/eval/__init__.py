"""pass@k evaluation: the unbiased estimator, the evaluation runner over a RolloutEngine, JSON and plots."""

from megatron_apo.eval.pass_at_k import mean_pass_at_k, pass_at_k, powers_of_two_up_to

__all__ = ["mean_pass_at_k", "pass_at_k", "powers_of_two_up_to"]
