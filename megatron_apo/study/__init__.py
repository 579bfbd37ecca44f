"""Reproduction studies: methods x seeds -> RL runs -> pass@k with paired bootstrap CIs (docs/science.md)."""

from megatron_apo.study.config import StudyConfig, load_study_config

__all__ = ["StudyConfig", "load_study_config"]
