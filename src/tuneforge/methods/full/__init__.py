"""Full fine-tuning: every parameter trains."""
