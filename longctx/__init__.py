"""longctx: long-context GPT-2 training on our own Triton FlashAttention.

The one import root of the project: `from longctx.kernels import flash_attention`,
`from longctx.model import GPT`, `longctx.data`, `longctx.trainer`, `longctx.train` (train.py),
`longctx.scripts` (sample, export_hf, eval_longdoc, ...) and the Hydra configs in longctx/configs.

Installed (`pip install longctx-gpt`), the subpackages sit inside this folder: the wheel maps the
repository's top-level folders into it (pyproject.toml: kernels/ -> longctx/kernels, ...), and the
wheel has no other top-level package, so it never collides with other `kernels` or `trainer`
packages. In a checkout (PYTHONPATH=<repo>, `python train.py`, pytest, `pip install -e .`) they do
not: this package then also searches the repository root, so `longctx.kernels` is <repo>/kernels,
and longctx/train.py and longctx/configs are links to <repo>/train.py and <repo>/configs.

A checkout also keeps the short names of DESIGN.md (`from kernels import flash_attention`,
`from model import GPT`): there `kernels`, `model`, `data` and `trainer` are aliases, the very
module objects of `longctx.kernels`, ... (each module is loaded once, under its longctx name: the
kernel's torch.library ops cannot be registered twice). The package's own __init__ calls
`_alias(__name__)` when imported under its short name, and `_AliasFinder` maps every submodule
(`import kernels.flash`, `from model.gpt import GPT`) to its longctx module.
"""
import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

SHORT_NAMES = ("kernels", "model", "data", "trainer")

_here = Path(__file__).resolve().parent
if not (_here / "kernels").is_dir():  # a checkout: the subpackages are the repository's folders
    __path__.append(str(_here.parent))  # a package's __path__: a list


def _alias(name: str) -> None:
    """Make `name` (a short name, being imported) the module `longctx.<name>`.

    Called from the top of kernels/__init__.py (and model/, data/, trainer/) when it runs under
    its short name. The import system returns whatever sys.modules[name] holds once that file
    has run, so `import kernels` yields longctx.kernels; the rest of the file still runs, on a
    throwaway module, where its relative imports resolve (through _AliasFinder) to the longctx
    modules already loaded.
    """
    if name not in SHORT_NAMES:
        raise ImportError(f"import this package as longctx.{name.rpartition('.')[2]}, not as {name}")
    sys.modules[name] = importlib.import_module(f"{__name__}.{name}")


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`kernels.flash` -> the module `longctx.kernels.flash`, once `kernels` is our alias.

    Acts only on submodules of a short name whose sys.modules entry IS the longctx package, so an
    unrelated package of the same name (Hugging Face `kernels`) is left alone.
    """

    def find_spec(self, fullname, path=None, target=None):
        top, dot, _ = fullname.partition(".")
        if not dot or top not in SHORT_NAMES:
            return None
        mod = sys.modules.get(top)
        if mod is None or mod is not sys.modules.get(f"{__name__}.{top}"):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{spec.name}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has just set module.__spec__ to the alias spec: put the real one back
        # (its name stays longctx.<...>, which pickling and `python -m` rely on).
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
