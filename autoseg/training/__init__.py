"""Training: a readable loop, its hooks (checkpoint, log, validate, plot), losses and schedules."""
