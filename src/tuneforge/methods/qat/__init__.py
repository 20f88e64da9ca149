"""Quantization-aware training (Jacob et al. 2018) with torchao: fake-quantised int8-activation /
int4-or-int8-weight linear layers during training, converted to real quantised weights afterwards."""
