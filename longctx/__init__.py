"""longctx: long-context GPT-2 training on our own Triton FlashAttention.

The one import root of the project: `from longctx.kernels import flash_attention`,
`from longctx.model import GPT`, `longctx.data`, `longctx.trainer`, `longctx.train` (train.py).

Installed (`pip install longctx-gpt`), the subpackages sit inside this folder, as the wheel maps
the repository's top-level folders into it (pyproject.toml: kernels/ -> longctx/kernels, ...).
In a checkout (PYTHONPATH=<repo>, `python train.py`, `python scripts/x.py`, pytest) they do not:
this package then also searches the repository root, so `longctx.kernels` is <repo>/kernels and
`longctx.train` is <repo>/train.py. Either way every module has one name, `longctx.<...>`; the
subpackages refuse to be imported under another (`import kernels`), which would load them twice
(the kernel's torch.library ops cannot be registered twice).
"""
from pathlib import Path

_here = Path(__file__).resolve().parent
if not (_here / "kernels").is_dir():  # a checkout: the subpackages are the repository's folders
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)

__version__ = "0.1.0"

