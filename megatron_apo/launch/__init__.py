"""Scale-out launching: the parallelism planner, Ray-cluster helpers for the Slurm scripts, NeMo-Run recipes."""
