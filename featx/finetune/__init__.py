"""Fine-tuning from a freeze point: settings, freeze point, data, checkpoints, training, the job, the saved model."""
