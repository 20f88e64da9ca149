"""(IA)^3 (Liu et al. 2022): learned rescaling of keys, values and feed-forward activations, via peft."""
