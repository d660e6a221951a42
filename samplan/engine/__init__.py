"""The generic training and prediction pieces that methods compose and the trainer and predictor run: the training
recipe, losses, optimisers and schedules, augmentation, the default train/validation steps, and dense (slice-wise
or sliding-window) prediction. Below `methods`, above `models`/`preprocessing`: a method builds its recipe and
prediction from these without importing the trainer or the predictor."""
