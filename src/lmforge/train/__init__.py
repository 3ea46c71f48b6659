"""The one training loop shared by pretraining and fine-tuning, with checkpoints and metrics."""
