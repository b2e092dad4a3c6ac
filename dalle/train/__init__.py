"""Training: the loop shared by every model, checkpoints, distributed set-up and the tasks."""
