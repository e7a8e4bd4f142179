"""The GPT-2 model: `from model import GPT, GPTConfig, build_model`."""
from .attention import attend
from .gpt import GPT, Block, GPTConfig, build_model

__all__ = ["GPT", "GPTConfig", "Block", "build_model", "attend"]
