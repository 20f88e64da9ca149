"""tuneforge: pretrain and fine-tune transformer language models from one config.

The library is organised along four axes (see docs): model family (`tuneforge.models`), method
(`tuneforge.methods`), objective (`tuneforge.objectives`) and data format (`tuneforge.data`), with one
training loop (`tuneforge.engine`).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
