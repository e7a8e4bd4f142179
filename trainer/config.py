"""The schema of `python train.py`'s settings: typed dataclasses, one per config group.

The YAML files in configs/ stay the presets users edit; these classes say what each key means,
its type and its allowed values. They are registered in Hydra's ConfigStore (`register()`, run on
import) under `schema/...`, and every YAML file names its schema first in its defaults list
(`optional /schema/<group>@_here_: <name>`), so Hydra checks the types when it composes the
config: `train.lr=abc` fails while composing. Ranges and allowed values are checked by each
class's `__post_init__`, which runs when the composed DictConfig becomes objects
(`as_config`). trainer/cli.py turns either failure into one line, before any work.

Modules receive these objects (`cfg.train.lr` is a float), never a DictConfig. `as_config` also
accepts a plain dict or a DictConfig composed without the schema (tests, scripts), and fills in
the defaults below for missing keys.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from longctx.trainer import ConfigError

MICRO_BATCH_AUTO = "auto"


# --------------------------------------------------------------------------------------- checks
def _int(obj, key: str, minimum: int = 0, null: bool = False, prefix: str = "") -> None:
    """`prefix+key` of obj is an int >= minimum (or None when null); one-line ConfigError otherwise."""
    v = getattr(obj, key)
    if v is None and null:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        what = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        raise ConfigError(f"{prefix}{key}={v!r} must be {what}{' or null' if null else ''}")


def _number(obj, key: str, minimum: float = 0.0, *, above: bool = False, below: float | None = None,
            null: bool = False, prefix: str = "") -> None:
    """A finite real number >= minimum (> when `above`), < below when given."""
    v = getattr(obj, key)
    if v is None and null:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < minimum or (above and v == minimum) or (below is not None and v >= below):
        rng = f"{'>' if above else '>='} {minimum:g}" + (f" and < {below:g}" if below is not None else "")
        raise ConfigError(f"{prefix}{key}={v!r} must be a number {rng}{' or null' if null else ''}")


def _choice(obj, key: str, allowed: tuple, prefix: str = "", hint: str = "") -> None:
    v = getattr(obj, key)
    if v not in allowed:
        names = [str(a) for a in allowed]
        raise ConfigError(f"{prefix}{key}={v!r}: use {hint or ', '.join(names[:-1]) + ' or ' + names[-1]}")


# ---------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """configs/model/*.yaml: the GPT's sizes (model/gpt.py builds it; defaults = GPT-2 small)."""
    name: str = "gpt2_small"
    "label for logs and W&B"
    n_layer: int = 12
    "transformer blocks"
    n_head: int = 12
    "attention heads; head dim = n_embd / n_head"
    n_embd: int = 768
    "residual stream width; the MLP is 4 * n_embd wide"
    vocab_size: int = 50257
    "GPT-2 BPE vocabulary (targets are always < this)"
    pad_vocab_multiple: Optional[int] = 64
    "wte/lm_head rows padded up to a multiple of this (50257 -> 50304); null = 1"
    dropout: Optional[float] = 0.0
    "embedding + residual dropout, in [0, 1); no attention-probability dropout"
    bias: bool = True
    "biases in Linear and LayerNorm layers, as GPT-2"
    backend: str = "ours"
    "ours | hf_eager | hf_sdpa (Hugging Face GPT2LMHeadModel of these sizes, model/hf_baseline.py)"

    def __post_init__(self):
        for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
            _int(self, key, 1, prefix="model.")
        _int(self, "pad_vocab_multiple", 1, null=True, prefix="model.")
        _number(self, "dropout", below=1.0, null=True, prefix="model.")
        _choice(self, "backend", ("ours", "hf_eager", "hf_sdpa"), "model.")


# ------------------------------------------------------------------------------------ attention
ATTENTION_IMPLS = ("flash", "block_sparse", "sdpa", "naive")
LAYOUTS = ("dense", "local", "strided", "fixed", "butterfly", "bigbird", "longformer")


@dataclass
class AttentionConfig:
    """configs/attention/{flash,sdpa,naive}.yaml: which attention the model runs (model/attention.py)."""
    impl: str = "flash"
    "flash (ours, Triton) | block_sparse | sdpa (PyTorch) | naive (materialised scores)"
    cpu_fallback: str = "sdpa"
    ("without a CUDA GPU (and no TRITON_INTERPRET=1) our kernel cannot run: sdpa = run the fallback "
     "(flash -> sdpa, block_sparse -> the reference attention with the same mask), logged once | error = stop")

    def __post_init__(self):
        _choice(self, "impl", ATTENTION_IMPLS, "attention.")
        _choice(self, "cpu_fallback", ("sdpa", "error"), "attention.")


@dataclass
class BlockSparseConfig(AttentionConfig):
    """configs/attention/block_sparse.yaml: the layout of kept key blocks (kernels/block_mask.py)."""
    impl: str = "block_sparse"
    layout: str = "local"
    "dense | local | strided | fixed | butterfly | bigbird | longformer"
    block_size: int = 128
    "tokens per block (power of two >= 16); the kernel runs each block as one or more of its tiles"
    block_m: Optional[int] = None
    "query block size (null = block_size)"
    block_n: Optional[int] = None
    "key block size (null = block_size)"
    window_blocks: int = 2
    "local, bigbird, longformer: keep key blocks with |q_block - k_block| <= this"
    stride: int = 8
    "strided: window of stride blocks + every stride-th column; fixed: chunks of stride blocks"
    summary: int = 1
    "fixed: the last summary blocks of every chunk are seen by all rows (1..stride)"
    global_blocks: int = 1
    "bigbird: the first global_blocks block rows and columns are global"
    random_blocks: int = 2
    "bigbird: extra random key blocks per query block row"
    seed: int = 0
    "bigbird: seed of the random blocks"
    per_head: bool = False
    "bigbird: different random blocks for every head"
    global_tokens: List[int] = field(default_factory=lambda: [0])
    "longformer: token positions whose block row and column are kept entirely"

    def __post_init__(self):
        super().__post_init__()
        _choice(self, "layout", LAYOUTS, "attention.")


# ----------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """configs/data/*.yaml, the keys every source has (data/prepare.py)."""
    name: str = "stdlib"
    "source: stdlib | local | openwebtext"
    val_fraction: float = 0.1
    "validation share, in (0, 1)"
    split_seed: Optional[int] = 0
    "seed of the validation split (and of the max_files subset)"
    cache_dir: Optional[str] = None
    "token files go to <cache_dir>/<name>-<key>/; null = $LONGCTX_CACHE or ~/.cache/longctx"
    rebuild: Any = "auto"
    "auto: build if missing, rebuild if bad | always | never: use it or stop (true/false = always/never)"
    num_proc: Optional[int] = None
    "tokenizer threads / processes; null = all cores"
    progress: bool = True
    "show the progress bars"

    def __post_init__(self):
        _choice(self, "name", ("stdlib", "local", "openwebtext"), "data.")
        if self.rebuild is True or self.rebuild is False:
            self.rebuild = "always" if self.rebuild else "never"
        _choice(self, "rebuild", ("auto", "always", "never"), "data.", "auto, always or never (or true/false)")
        _number(self, "val_fraction", above=True, below=1.0, prefix="data.")
        _int(self, "split_seed", 0, null=True, prefix="data.")
        _int(self, "num_proc", 1, null=True, prefix="data.")


@dataclass
class StdlibDataConfig(DataConfig):
    """configs/data/stdlib.yaml: the running Python's standard library source (offline)."""
    root: Optional[str] = None
    "standard library folder; null = sysconfig.get_paths()['stdlib']"
    max_files: Optional[int] = None
    "seeded random subset of this many files (>= 2); null = all"

    def __post_init__(self):
        super().__post_init__()
        _int(self, "max_files", 2, null=True, prefix="data.")


@dataclass
class LocalDataConfig(DataConfig):
    """configs/data/local.yaml: your own text files."""
    name: str = "local"
    paths: List[str] = field(default_factory=list)
    "globs (** allowed) or folders, relative to the directory you launch from"
    text_field: str = "text"
    "key holding the text in .jsonl lines"
    max_files: Optional[int] = None
    "seeded random subset of this many files (>= 2); null = all"
    val_fraction: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        _int(self, "max_files", 2, null=True, prefix="data.")


@dataclass
class OpenWebTextDataConfig(DataConfig):
    """configs/data/openwebtext.yaml: the paper's corpus through Hugging Face datasets."""
    name: str = "openwebtext"
    hf_name: str = "Skylion007/openwebtext"
    "Hugging Face dataset id"
    hf_config: Optional[str] = None
    "dataset configuration name"
    hf_revision: Optional[str] = None
    "git revision of the dataset"
    hf_cache_dir: Optional[str] = None
    "where datasets keeps the download; null = HF_DATASETS_CACHE"
    text_field: str = "text"
    "column holding the text"
    val_fraction: float = 0.0005
    split_seed: Optional[int] = 2357


DATA_SCHEMAS = {"stdlib": StdlibDataConfig, "local": LocalDataConfig, "openwebtext": OpenWebTextDataConfig}


# ------------------------------------------------------------------------------------- parallel
@dataclass
class ParallelConfig:
    """configs/parallel/single.yaml (and the keys ddp/fsdp share): trainer/parallelize.py."""
    name: str = "single"
    "single | ddp | fsdp (ddp/fsdp under torchrun)"
    activation_checkpointing: str = "none"
    "none | full (every block) | selective (every ac_every-th block)"
    ac_every: Optional[int] = 2
    "selective: checkpoint blocks 0, ac_every, 2*ac_every, ... (null = 2)"
    compile_fullgraph: bool = False
    "with compile on: torch.compile(..., fullgraph=...)"
    timeout_s: Optional[float] = 1800
    "collective timeout in seconds"

    def __post_init__(self):
        _choice(self, "name", ("single", "ddp", "fsdp"), "parallel.")
        _choice(self, "activation_checkpointing", ("none", "full", "selective"), "parallel.")
        _int(self, "ac_every", 1, null=True, prefix="parallel.")
        self.ac_every = self.ac_every or 2


@dataclass
class DDPConfig(ParallelConfig):
    """configs/parallel/ddp.yaml: DistributedDataParallel."""
    name: str = "ddp"
    bucket_cap_mb: int = 25
    "DDP gradient bucket size in MB"
    find_unused_parameters: bool = False
    "DDP's find_unused_parameters"


PARAM_DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class FSDPConfig(ParallelConfig):
    """configs/parallel/fsdp.yaml: FSDP2 fully_shard per block + root."""
    name: str = "fsdp"
    param_dtype: str = "auto"
    "compute/all-gather dtype of params: auto (= train.precision on CUDA, fp32 on CPU) | bf16 | fp16 | fp32"
    reduce_dtype: str = "fp32"
    "gradient reduce-scatter dtype: bf16 | fp16 | fp32"
    reshard_after_forward: bool = True
    "false = ZeRO-2-like: keep gathered params until backward"
    reshard_last_block: bool = False
    "keep the last block's params gathered for the backward"
    reshard_between_micro_steps: bool = False
    "false = gathered params stay from a step's first micro-step to its last backward (one all-gather per block and step)"
    prefetch: int = 1
    "all-gather the next k blocks' params ahead; 0 = FSDP2's implicit prefetch only"
    cpu_offload: bool = False
    "shard params/grads/optimizer state on CPU"

    def __post_init__(self):
        super().__post_init__()
        _choice(self, "param_dtype", PARAM_DTYPES, "parallel.")
        _choice(self, "reduce_dtype", PARAM_DTYPES[1:], "parallel.")
        _int(self, "prefetch", 0, prefix="parallel.")


PARALLEL_SCHEMAS = {"single": ParallelConfig, "ddp": DDPConfig, "fsdp": FSDPConfig}


# --------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    """configs/logger/{none,wandb}.yaml. none: the console, train.log and metrics.jsonl only; wandb:
    Weights & Biases too (trainer/logger.py), rank 0 only. One schema for both, so a preset can set
    e.g. logger.group and still run with logger=none."""
    name: str = "none"
    "none | wandb"
    mode: str = "auto"
    "wandb: auto (online if logged in, else offline) | online | offline | disabled"
    project: str = "longctx-gpt"
    "W&B project"
    entity: Optional[str] = None
    "W&B team/user; null = your default entity"
    run_name: Optional[str] = None
    "display name; null = the run directory's name"
    group: Optional[str] = None
    "W&B group"
    tags: List[str] = field(default_factory=list)
    "W&B tags"

    def __post_init__(self):
        _choice(self, "name", ("none", "wandb"), "logger.")
        _choice(self, "mode", ("auto", "online", "offline", "disabled"), "logger.")


LOGGER_SCHEMAS = {"none": LoggerConfig, "wandb": LoggerConfig}


# ---------------------------------------------------------------------------------- train/optim
@dataclass
class OptimConfig:
    """`train:` in configs/config.yaml: batch, AdamW, learning-rate schedule, precision."""
    global_batch_tokens: int = 524288
    "tokens per optimizer step = micro_batch x seq_len x grad_accum x GPUs"
    micro_batch: Any = MICRO_BATCH_AUTO
    "sequences per forward pass per GPU: a positive integer or auto"
    micro_batch_tokens: Any = MICRO_BATCH_AUTO
    "micro_batch=auto aims at this many tokens per forward pass: a positive integer or auto (by GPU memory)"
    lr: float = 6.0e-4
    "peak learning rate (after warmup)"
    min_lr: float = 6.0e-5
    "learning rate at the end of the decay"
    warmup_steps: int = 200
    "linear warmup from lr/warmup_steps to lr"
    decay: str = "cosine"
    "cosine | linear | constant"
    decay_steps: Optional[int] = None
    "step at which min_lr is reached; null = max_steps"
    weight_decay: float = 0.1
    "AdamW decay on 2-D matmul weights"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    "AdamW betas, two numbers in [0, 1)"
    eps: float = 1.0e-8
    "AdamW epsilon"
    grad_clip: Optional[float] = 1.0
    "clip the global gradient norm to this (0 or null: no clipping)"
    precision: str = "bf16"
    "bf16 | fp16 | fp32 (CUDA only; the CPU is always fp32)"

    def __post_init__(self):
        p = "train."
        for key in ("micro_batch", "micro_batch_tokens"):
            v = getattr(self, key)
            if v != MICRO_BATCH_AUTO and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"train.{key}={v!r} must be a positive integer or auto")
        if not isinstance(self.global_batch_tokens, int) or self.global_batch_tokens <= 0:
            raise ConfigError(f"train.global_batch_tokens={self.global_batch_tokens!r} must be a positive "
                              f"integer, e.g. 524288")
        _int(self, "warmup_steps", prefix=p)
        _int(self, "decay_steps", 1, null=True, prefix=p)
        _number(self, "lr", above=True, prefix=p)
        _number(self, "min_lr", prefix=p)
        _number(self, "weight_decay", prefix=p)
        _number(self, "eps", above=True, prefix=p)
        _number(self, "grad_clip", null=True, prefix=p)
        b = self.betas
        if len(b) != 2 or not all(0 <= x < 1 for x in b):
            raise ConfigError(f"train.betas={list(b)!r} must be two numbers in [0, 1), e.g. [0.9,0.95]")
        _choice(self, "decay", ("cosine", "linear", "constant"), p)
        _choice(self, "precision", ("bf16", "fp16", "fp32"), p, "bf16, fp16 or fp32")
        if self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")


# ----------------------------------------------------------------------------------------- root
COMPILE_MODES = ("auto", "true", "false", "blocks", "model")


@dataclass
class Config:
    """configs/config.yaml: the root of `python train.py`'s settings."""
    seq_len: int = 1024
    "context length in tokens (training windows are seq_len + 1 tokens)"
    max_steps: int = 10000
    "optimizer steps to train for (>= 1)"
    seed: int = 1337
    "seeds model init and the data windows"
    device: str = "auto"
    "auto (cuda if available, else cpu) | cuda | cpu"
    compile: str = "auto"
    "auto | true | false | blocks (each transformer block) | model (whole model; parallel=single)"
    run_dir: str = "outputs/run"
    "where this run writes (config.yaml, train.log, metrics.jsonl, checkpoints/)"
    resume: Optional[str] = None
    "null: from scratch | auto: newest checkpoint in run_dir (or scratch) | a checkpoint or run dir"
    init_from: Optional[str] = None
    "pretrained weights: a Hugging Face GPT-2 id or folder, or one of our run dirs / checkpoints"
    init_positions: str = "tile"
    "tile | interpolate: how init_from's positions are extended to seq_len"
    eval_every: int = 500
    "evaluate every this many steps (and at the end); 0 = only at the end"
    eval_tokens: int = 1048576
    "validation tokens scored (a multiple of seq_len); 0 = no evaluation"
    ckpt_every: int = 1000
    "checkpoint every this many steps (and at the end); 0 = only at the end"
    ckpt_keep: int = 3
    "keep the newest this many checkpoints (0 = keep all)"
    log_every: int = 10
    "console line + metrics.jsonl row every this many steps"
    gc_every: int = 50
    "automatic GC off while training; gc.collect(1) every this many steps on every rank at once (0 = automatic)"
    train: OptimConfig = field(default_factory=OptimConfig)
    model: Any = None
    "group model=: ModelConfig"
    data: Any = None
    "group data=: StdlibDataConfig | LocalDataConfig | OpenWebTextDataConfig"
    attention: Any = None
    "group attention=: AttentionConfig | BlockSparseConfig"
    parallel: Any = None
    "group parallel=: ParallelConfig | DDPConfig | FSDPConfig"
    logger: Any = None
    "group logger=: LoggerConfig"

    def __post_init__(self):
        if str(self.compile) in ("True", "False"):  # a YAML/CLI boolean, or its string
            self.compile = str(self.compile).lower()
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile={self.compile!r}: use auto (GPU: the fastest measured way, CPU: off), "
                              f"true, false, blocks (each transformer block) or model (the whole model)")
        if self.compile == "model" and self.parallel is not None and self.parallel.name != "single":
            raise ConfigError(f"compile=model compiles the whole model as one graph, which parallel="
                              f"{self.parallel.name} cannot wrap; use compile=blocks (or auto) with "
                              f"parallel={self.parallel.name}")
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ConfigError(f"seq_len={self.seq_len!r} must be a positive integer, e.g. seq_len=1024")
        _int(self, "max_steps")
        if self.max_steps == 0:
            raise ConfigError("max_steps=0: train for at least one step")
        for key in ("seed", "eval_every", "eval_tokens", "ckpt_every", "ckpt_keep", "log_every", "gc_every"):
            _int(self, key)
        d = self.device
        if d not in ("auto", "cuda", "cpu") and not d.startswith("cuda:"):
            raise ConfigError(f"device={d!r} is not one of auto, cuda, cuda:N, cpu")
        if d.startswith("cuda:") and not d[5:].isdigit():
            raise ConfigError(f"device={d!r}: the GPU index must be a number")
        _choice(self, "init_positions", ("tile", "interpolate"))
        if not str(self.run_dir or "").strip():
            raise ConfigError("run_dir is empty; give a folder, e.g. run_dir=outputs/my_run")


GROUP_SCHEMAS = {  # group -> (discriminating key, {value: class}, class when the key is missing)
    "model": (None, {}, ModelConfig),
    "train": (None, {}, OptimConfig),
    "attention": ("impl", {"block_sparse": BlockSparseConfig}, AttentionConfig),
    "data": ("name", DATA_SCHEMAS, StdlibDataConfig),
    "parallel": ("name", PARALLEL_SCHEMAS, ParallelConfig),
    "logger": ("name", LOGGER_SCHEMAS, LoggerConfig),
}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore: schema/config and schema/<group>/<option>, which the
    YAML files of configs/ name first in their defaults lists."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="schema", name="config", node=Config)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/attention", name="attention", node=AttentionConfig)
    cs.store(group="schema/attention", name="block_sparse", node=BlockSparseConfig)
    for group in ("data", "parallel", "logger"):
        for name, cls in GROUP_SCHEMAS[group][1].items():
            cs.store(group=f"schema/{group}", name=name, node=cls)


# ------------------------------------------------------------------------------ DictConfig -> objects
def _schema_for(group: str, node) -> type:
    key, by_value, fallback = GROUP_SCHEMAS[group]
    if key is None:
        return fallback
    value = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
    if group in ("data", "parallel", "logger") and value is not None and value not in by_value:
        names = list(by_value)  # one schema per option: an unknown name is the first thing to say
        raise ConfigError(f"{group}.{key}={value!r}: use {', '.join(names[:-1])} or {names[-1]}")
    return by_value.get(value, fallback)


def as_config(cfg, strict: bool = False) -> Config:
    """The typed Config of a composed DictConfig (or a plain, possibly partial, dict); a Config is
    returned as it is. A wrong type or a value out of range: ConfigError, one line. strict (train.py,
    the command line): an unknown key too; otherwise keys the schema does not know are left out, so
    the trainer's functions also take a config of another program (scripts/eval_longdoc.py)."""
    if isinstance(cfg, Config):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if OmegaConf.is_config(cfg) and not strict:  # plain nodes: keys can be left out
            cfg = OmegaConf.to_container(cfg, resolve=False)
        elif isinstance(cfg, dict):  # e.g. as_group's {group: node of a composed config}: plain too (a
            cfg = {k: OmegaConf.to_container(v, resolve=False) if OmegaConf.is_config(v) else v  # typed node
                   for k, v in cfg.items()}  # refuses the filtered dict assigned back below)
        raw = OmegaConf.create(cfg) if not OmegaConf.is_config(cfg) else cfg.copy()
        OmegaConf.set_struct(raw, False)
        base = OmegaConf.structured(Config)
        for group in GROUP_SCHEMAS:  # each group's schema: the option's class (or the default one)
            node = raw.get(group) or {}
            if isinstance(node, str):  # {"parallel": "ddp"}: that option's defaults
                raw[group] = node = {GROUP_SCHEMAS[group][0] or "name": node}
            elif "defaults" in node:  # a preset read straight from its YAML file: its defaults list
                node = raw[group] = {k: v for k, v in node.items() if k != "defaults"}  # is not a setting
            cls = _schema_for(group, node)
            if not strict and group in raw:
                known = {f.name for f in dataclasses.fields(cls)}
                raw[group] = {k: v for k, v in raw[group].items() if k in known}
            OmegaConf.set_struct(base, False)
            base[group] = OmegaConf.structured(cls)
            OmegaConf.set_struct(base, True)
        if not strict:
            known = {f.name for f in dataclasses.fields(Config)}
            raw = OmegaConf.create({k: v for k, v in raw.items() if k in known})
        merged = OmegaConf.merge(base, raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(error_line(e)) from None


def as_group(group: str, node):
    """One group's typed object (e.g. as_group("logger", cfg.logger)) for callers whose root
    config is not train.py's (scripts/eval_longdoc.py); a dataclass is returned as it is."""
    if dataclasses.is_dataclass(node):
        return node
    return getattr(as_config({group: node}), group)


def to_dict(cfg) -> dict:
    """Plain nested dict of a typed config (or a DictConfig, resolved): for W&B, checkpoints, YAML."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def error_line(e: Exception) -> str:
    """One line for an OmegaConf validation error: the key, the value, the expected type."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ConfigKeyError):
        return f"{key}: no such setting (every setting is listed in configs/)"
    if isinstance(e, ValidationError):
        ref = getattr(e, "ref_type", None)
        want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
            getattr(ref, "__origin__", None) and ref.__args__[0] or ref, None)
        value = getattr(e, "value", None)
        if want is None and "is not a valid bool" in msg:
            want = "true or false"
        if want is None and "could not be converted to" in msg:
            want = msg.rsplit("could not be converted to", 1)[1].strip(" .").lower()
            want = {"integer": "an integer", "float": "a number", "boolean": "true or false"}.get(want, want)
        if want:
            return f"{key}={value!r} must be {want}"
    return f"{key}: {msg}"


register()
