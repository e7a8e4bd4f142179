"""Console entry points of the installed package (pyproject.toml [project.scripts]).

`longctx-train ARGS` is `python train.py ARGS`, `longctx-eval ARGS` is `python scripts/eval_longdoc.py
ARGS`: each runs the file as __main__, so its command-line checks run first and Hydra finds the
configs next to the file (longctx/configs, a link to <repo>/configs in a checkout). `longctx-sample`
and `longctx-export` call the scripts' main(argv) directly.
"""
import runpy


def train() -> None:
    runpy.run_module("longctx.train", run_name="__main__", alter_sys=True)


def eval_longdoc() -> None:
    runpy.run_module("longctx.scripts.eval_longdoc", run_name="__main__", alter_sys=True)
