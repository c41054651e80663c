"""Training: examples and data modules, the Lightning systems around the models, resume points."""
