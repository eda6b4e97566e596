"""Training: configs, hyperparameter resolution, collators, losses and the recipes."""
