"""QLoRA (Dettmers et al. 2023): LoRA on a base whose linear layers are stored in 4-bit NF4 (bitsandbytes)."""
