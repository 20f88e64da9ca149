"""LoRA (Hu et al. 2021) with rsLoRA and DoRA options, via peft."""
