"""Job execution: claim a job, validate its files, train, record events/checkpoints/models."""
