"""One file per training method; each exposes ``run(cfg, examples, reporter) -> TrainResult``."""
