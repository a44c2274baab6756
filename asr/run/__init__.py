"""A run: built from a config (`asr.run.training.assemble`) or a checkpoint to score (`asr.run.evaluation`), its
provenance, checkpoints and directory, the cluster (DDP, SLURM requeue), the warm-up, the console, logging
and W&B, results and reports."""
