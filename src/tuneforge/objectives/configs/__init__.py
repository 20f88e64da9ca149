"""Objective configs, one torch-free module each (recipes validate without importing torch)."""
