"""The GPT-2 model: `from model import GPT, GPTConfig, build_model`."""
if not __name__.startswith("longctx."):  # a checkout: `model` is longctx.model (longctx/__init__.py)
    __import__("longctx")._alias(__name__)
from .attention import attend
from .gpt import GPT, Block, GPTConfig, build_model

__all__ = ["GPT", "GPTConfig", "Block", "build_model", "attend"]
