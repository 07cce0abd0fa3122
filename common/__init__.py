"""The shared engine: data pipelines, training loop, evaluation, checkpoints, logging, benchmarking."""
