"""DeepSpeed engine, training loop, evaluation, checkpoints and logging (never imports Ray)."""
