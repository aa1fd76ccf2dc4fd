"""Fine-tuning tasks: task data readers, batching and metrics (heads and loops live elsewhere)."""
