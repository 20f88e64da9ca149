"""P-tuning v2 (Liu et al. 2022): deep prompts at every layer without reparameterisation, with the task head."""
