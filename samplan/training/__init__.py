"""Training: data loading and augmentation, losses, splits, checkpoints, logging and the trainer loop."""
