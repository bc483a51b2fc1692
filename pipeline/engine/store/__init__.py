"""Per-stream state in the model's own layout: slots, admission, resets, eviction, checkpoints."""
