"""Training: the four supervised RxT stages, the stateless baseline, the trainer and recipes."""
