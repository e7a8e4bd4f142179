"""The GPT-2 model: `from model import GPT, GPTConfig, build_model`."""
if not __name__.startswith("longctx."):  # one name per module: see longctx/__init__.py
    raise ImportError("import this package as longctx.model (`from longctx.model import ...`), not as model")
from .attention import attend
from .gpt import GPT, Block, GPTConfig, build_model

__all__ = ["GPT", "GPTConfig", "Block", "build_model", "attend"]
