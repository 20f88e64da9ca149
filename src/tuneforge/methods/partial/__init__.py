"""Partial fine-tuning: freeze the embeddings and the bottom N transformer layers."""
