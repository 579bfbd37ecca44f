"""pass@k evaluation: the unbiased estimator, the evaluation runner over a RolloutEngine, JSON and plots."""

from megatron_apo.eval.pass_at_k import mean_pass_at_k, pass_at_k, powers_of_two_up_to
from megatron_apo.eval.report import format_table, load_results, plot_pass_at_k, write_results
from megatron_apo.eval.runner import EvalConfig, evaluate

__all__ = [
    "EvalConfig",
    "evaluate",
    "format_table",
    "load_results",
    "mean_pass_at_k",
    "pass_at_k",
    "plot_pass_at_k",
    "powers_of_two_up_to",
    "write_results",
]
