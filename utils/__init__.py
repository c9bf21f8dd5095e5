"""Shared machinery for every step: config, distributed set-up, DeepSpeed config, models, data,
checkpoints, logging and the one training loop. Nothing in here knows about any particular step."""
