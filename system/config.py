"""Job configuration: nested dataclasses, presets as functions, `--set a.b=c` overrides.

Why dataclasses and not YAML: a typo in a key or a wrong type fails at load time with the key
named, before a cluster is asked for (torchtitan's habit).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

STRATEGIES = ("ddp", "fsdp", "deepspeed")


def _check_choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{section}.{name}={value!r} is not allowed; expected one of {allowed}")


def _check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{section}.{name}={value!r} is not allowed; expected a number {bound}")


@dataclass(kw_only=True)
class ModelConfig:
    """Which registered model to build and the config fields to override on it."""

    name: str = "transformer-tiny"
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name is empty; expected a name from models.list_models()")
        check_model(self.name, self.args)


def check_model(name: str, args: dict[str, Any]) -> None:
    """Refuse an unregistered model.name or model.args the model's config rejects.

    Why here: otherwise the name fails only in the workers, after Ray has started, once per
    rank. Only the config dataclass is built (no weights), so this costs milliseconds.
    """
    import models  # lazy: torch is imported only when a config is actually built

    known = models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        if close:
            expected = f"did you mean {' or '.join(map(repr, close))}? (`mnemo models` lists all)"
        else:
            expected = f"expected one of: {', '.join(known)} (`mnemo models` describes them)"
        raise ValueError(f"model.name={name!r} is not a registered model; {expected}")
    model_cfg = models.get_spec(name).config_fn()
    if is_dataclass(model_cfg):
        try:
            hints = typing.get_type_hints(type(model_cfg))
        except (NameError, TypeError):  # an annotation we cannot resolve: make_config decides
            hints = {}
        for key, value in args.items():
            if key in hints:
                _coerce(f"model.args.{key}", value, hints[key])
    try:
        models.make_config(name, **args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.args={args!r} for model.name={name!r}: {e}") from None


@dataclass(kw_only=True)
class DataConfig:
    """Where samples come from. `source` picks a builder in data/__init__.py."""

    source: str = "passkey"  # passkey | niah | text | shards
    path: str = ""  # text files / dirs (comma separated) or shard directory / index.json
    tokenizer: str = "byte"  # byte | path to a tokenizer.json
    num_workers: int = 0  # DataLoader processes per rank; 0 is fastest on 2 cores
    on_error: str = "raise"  # raise | skip (each skip counted in metrics.jsonl)
    shuffle_buffer: int = 1000  # bounded shuffle buffer of the shard reader
    eval_fraction: float = 0.0  # held-out share for text sources (0 = eval on fresh samples)
    # Synthetic passkey / needle-in-a-haystack: where the needle sits (fraction of the length);
    # a negative depth draws it uniformly per sample.
    depth: float = -1.0
    passkey_digits: int = 5
    passkey_alphabet: int = 10  # answer digits drawn from 0..alphabet-1 (chance 1/alphabet each)
    # Loss weight of a probe's non-answer targets (the answer's is 1): 1 = plain LM loss, 0 =
    # the answer only. The filler is predictable, so a plain loss barely trains retrieval.
    filler_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("data", "source", self.source, ("passkey", "niah", "text", "shards"))
        _check_choice("data", "on_error", self.on_error, ("raise", "skip"))
        _check_positive("data", "num_workers", self.num_workers, allow_zero=True)
        if self.source in ("text", "shards") and not self.path:
            raise ValueError(f"data.path is empty; data.source={self.source!r} needs a path")
        if not (-1.0 <= self.depth <= 1.0):
            raise ValueError(f"data.depth={self.depth!r}; expected a fraction in [0, 1] or -1")
        if self.passkey_digits < 1:
            raise ValueError(f"data.passkey_digits={self.passkey_digits}; expected >= 1")
        if not 2 <= self.passkey_alphabet <= 10:
            raise ValueError(
                f"data.passkey_alphabet={self.passkey_alphabet}; expected 2..10 (decimal digits)"
            )
        if not 0.0 <= self.filler_loss_weight <= 1.0:
            raise ValueError(
                f"data.filler_loss_weight={self.filler_loss_weight}; expected a weight in [0, 1]"
            )


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to `min_lr_ratio * lr`."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        _check_positive("optim", "lr", self.lr)
        _check_positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optim", "warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("optim", "grad_clip", self.grad_clip, allow_zero=True)
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(
                f"optim.min_lr_ratio={self.min_lr_ratio!r}; expected a value in [0, 1]"
            )


@dataclass(kw_only=True)
class TrainConfig:
    """Steps and batch geometry. One step consumes `batch_tokens` tokens over all ranks."""

    steps: int = 100
    seed: int = 0
    seq_len: int = 256
    batch_tokens: int = 4096  # global tokens per optimizer step (sum over ranks and micro-steps)
    micro_batch: int = 4  # sequences per rank per forward pass
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    deterministic: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch_tokens", "micro_batch"):
            _check_positive("train", name, getattr(self, name))
        _check_choice("train", "dtype", self.dtype, ("auto", "fp32", "bf16"))
        if self.batch_tokens % self.seq_len:
            raise ValueError(
                f"train.batch_tokens={self.batch_tokens} is not a multiple of "
                f"train.seq_len={self.seq_len}"
            )


@dataclass(kw_only=True)
class ScalingConfig:
    """How many workers, which strategy, and the Ray resources each worker asks for."""

    workers: int = 2
    strategy: str = "ddp"
    zero_stage: int = 2  # DeepSpeed ZeRO stage (1, 2, 3)
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    activation_checkpointing: bool = False
    max_failures: int = 0  # Ray Train restarts after a worker dies

    def __post_init__(self) -> None:
        _check_positive("scaling", "workers", self.workers)
        _check_choice("scaling", "strategy", self.strategy, STRATEGIES)
        _check_choice("scaling", "zero_stage", self.zero_stage, (1, 2, 3))
        _check_choice("scaling", "use_gpu", self.use_gpu, ("auto", "true", "false"))
        _check_positive("scaling", "cpus_per_worker", self.cpus_per_worker)
        _check_positive("scaling", "max_failures", self.max_failures, allow_zero=True)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Sharded checkpoints under RUN_DIR/checkpoints; `every` = 0 saves only at the end."""

    every: int = 0
    keep: int = 3
    async_save: bool = False

    def __post_init__(self) -> None:
        _check_positive("checkpoint", "every", self.every, allow_zero=True)
        _check_positive("checkpoint", "keep", self.keep)


WANDB_MODES = ("off", "offline", "online")
# The sinks' libraries are the `tracking` extra: a sink turned on without its library fails at
# load (before a cluster is asked for), not in every worker at its first logged step.
TRACKING_INSTALL = (
    "pip install 'mnemosyne-train[tracking]'  (in a checkout: pip install -e '.[tracking]')"
)


def _check_installed(option: str, module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"{option} needs the {module!r} package, which is not installed; "
            f"install it with: {TRACKING_INSTALL}"
        )


@dataclass(kw_only=True)
class LogConfig:
    """Rank 0 writes metrics.jsonl every `every` steps; TensorBoard and W&B mirror its numbers.

    tensorboard: event files in RUN_DIR/tensorboard/. wandb: off | offline | online, a run in
    RUN_DIR/wandb/ of project `wandb_project`, named after the run directory.
    """

    every: int = 10
    tensorboard: bool = False
    wandb: str = "off"
    wandb_project: str = "mnemosyne"

    def __post_init__(self) -> None:
        _check_positive("log", "every", self.every)
        if not isinstance(self.tensorboard, bool):
            raise ValueError(
                f"log.tensorboard={self.tensorboard!r} is not allowed; expected true or false"
            )
        _check_choice("log", "wandb", self.wandb, WANDB_MODES)
        if self.wandb != "off" and not self.wandb_project:
            raise ValueError("log.wandb_project is empty; W&B needs a project name")
        if self.tensorboard:
            _check_installed("log.tensorboard=true", "tensorboard")
        if self.wandb != "off":
            _check_installed(f"log.wandb={self.wandb}", "wandb")


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out loss every `every` steps (0 = never) over `batches` micro-batches per rank."""

    every: int = 0
    batches: int = 4

    def __post_init__(self) -> None:
        _check_positive("eval", "every", self.every, allow_zero=True)
        _check_positive("eval", "batches", self.batches)


@dataclass(kw_only=True)
class JobConfig:
    """Everything one run needs; written to RUN_DIR/config.json."""

    recipe: str = "transformer_lm"
    preset: str = "smoke"
    run_dir: str = ""
    resume: str = "auto"  # auto | never | PATH
    address: str = "auto"  # auto | local | HOST:PORT
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_address(self.address)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Whole-job checks: what the workers would otherwise find only after Ray has started.

ADDRESS_FORMS = "auto | local | HOST:PORT | ray://HOST:PORT"
_HOST_PORT = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r":(?P<port>[0-9]{1,5})"
)


def check_address(address: str) -> None:
    """Refuse a Ray address ray.init cannot use, before anything connects to it.

    http(s):// is the dashboard / Jobs API address of `ray job submit --address`, which
    ray.init refuses: say so, since it is the address a cluster's docs most often show.
    """
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ValueError(
            f"address={address!r} is a Ray dashboard / Jobs API URL (for `ray job submit "
            f"--address`), not a cluster address; expected {ADDRESS_FORMS}, e.g. HEAD:6379 or "
            "ray://HEAD:10001"
        )
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    m = _HOST_PORT.fullmatch(rest)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ValueError(
            f"address={address!r} is not a Ray address; expected {ADDRESS_FORMS} "
            "(PORT in 1..65535), e.g. 10.0.0.5:6379 or ray://head:10001"
        )


def launch_world(launcher: str = "ray", workers: int = 0) -> int:
    """The world size the loop will see: scaling.workers under Ray, torchrun's WORLD_SIZE
    (1 when run alone) when the loop runs in this process (`--launcher none`, torchrun)."""
    if launcher == "ray":
        return workers
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_job(cfg: JobConfig, world: int | None = None) -> None:
    """Cross-field rules of a job about to launch on `world` ranks (default scaling.workers).

    Not part of from_dict: a config.json is also loaded under torchrun with another world
    size, and by tools that only read it.
    """
    t = cfg.train
    world = cfg.scaling.workers if world is None else world
    per_step = t.seq_len * t.micro_batch
    if t.batch_tokens % (per_step * world):
        fits = [
            n
            for n in range(1, t.batch_tokens // per_step + 1)
            if t.batch_tokens % (per_step * n) == 0
        ]
        raise ValueError(
            f"train.batch_tokens={t.batch_tokens} is not a multiple of train.seq_len * "
            f"train.micro_batch * workers = {t.seq_len} * {t.micro_batch} * {world} = "
            f"{per_step * world}; with this batch, seq_len and micro_batch the worker count "
            f"must be one of {fits or 'none (batch_tokens < seq_len * micro_batch)'}, or change "
            "train.batch_tokens / train.micro_batch"
        )
    d = cfg.data
    if cfg.eval.every > 0 and d.source in ("text", "shards") and d.eval_fraction <= 0:
        held = "windows" if d.source == "text" else "shards"
        raise ValueError(
            f"eval.every={cfg.eval.every} evaluates on held-out {held}, but data.source="
            f"{d.source!r} has data.eval_fraction={d.eval_fraction}; expected "
            "data.eval_fraction in (0, 1) (e.g. --set data.eval_fraction=0.1) or eval.every=0"
        )
    if cfg.data.source in ("passkey", "niah"):
        import numpy as np

        from data.synthetic import make_needle  # numpy only; builds one probe

        kwargs = {"kind": cfg.data.source, "digits": cfg.data.passkey_digits}
        kwargs["alphabet"] = cfg.data.passkey_alphabet
        try:
            make_needle(np.random.default_rng(0), t.seq_len + 1, **kwargs)
        except ValueError as e:
            need = re.search(r">= (\d+)", str(e))
            bound = f"expected train.seq_len >= {int(need[1]) - 1}" if need else str(e)
            raise ValueError(
                f"train.seq_len={t.seq_len} is too short for data.source={cfg.data.source!r} "
                f"probes ({cfg.data.passkey_digits}-digit key, question and answer); {bound}"
            ) from None


def check_local(cfg: JobConfig) -> None:
    """Checks that hold only where this machine's files and devices are the workers' (an
    embedded or local cluster, `ray job submit` onto the head, torchrun): data paths exist,
    the tokenizer's ids fit the model's vocabulary, GPUs asked for are present.

    Skipped for a remote address (HOST:PORT, ray://): there the paths name the cluster's
    filesystem, not this one.
    """
    if cfg.address not in ("auto", "local"):
        return
    d = cfg.data
    vocab = None  # token ids the data can hold
    if d.source in ("passkey", "niah"):
        vocab = 258  # byte tokenizer (data/tokenizers.py)
    elif d.source == "text":
        for part in [p for p in d.path.split(",") if p]:
            if not _remote(part) and not Path(part).exists():
                raise ValueError(
                    f"data.path entry {part!r} does not exist; expected text files or "
                    "directories (comma separated)"
                )
        vocab = _tokenizer_vocab(d.tokenizer)
    elif d.source == "shards" and not _remote(d.path):
        vocab = _check_shard_path(d.path, d.eval_fraction)
    model_vocab = getattr(_model_config(cfg), "vocab_size", None)
    if vocab is not None and isinstance(model_vocab, int) and vocab > model_vocab:
        raise ValueError(
            f"the data's token ids go up to {vocab - 1} but model.name={cfg.model.name!r} has "
            f"vocab_size={model_vocab}; expected vocab_size >= {vocab} (--set "
            f"model.args.vocab_size={vocab}) or a tokenizer / dataset that fits"
        )
    if cfg.scaling.use_gpu == "true" and cfg.address == "local":
        import torch

        have, need = torch.cuda.device_count(), cfg.scaling.workers * cfg.scaling.gpus_per_worker
        if need > have:
            raise ValueError(
                f"scaling.use_gpu=true asks for {need:g} GPUs ({cfg.scaling.workers} workers x "
                f"{cfg.scaling.gpus_per_worker:g}) but this machine has {have}; expected "
                "scaling.use_gpu=auto / false or fewer --workers"
            )


def _remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Relative local data paths (data.path entries, a tokenizer.json) made absolute.

    Ray Train workers run in another working directory than the driver, so `--set
    data.path=runs/shards` must be resolved where the user typed it. Only for the addresses
    whose workers share this machine's files (auto, local); remote URLs stay as they are.
    """
    if cfg.address not in ("auto", "local"):
        return cfg
    d = cfg.data

    def fix(part: str) -> str:
        return part if not part or _remote(part) else str(Path(part).absolute())

    path = ",".join(fix(x) for x in d.path.split(",")) if d.path else d.path
    tokenizer = d.tokenizer if d.tokenizer == "byte" else fix(d.tokenizer)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, path=path, tokenizer=tokenizer))


def _model_config(cfg: JobConfig) -> Any:
    import models

    return models.make_config(cfg.model.name, **cfg.model.args)


def _tokenizer_vocab(spec: str) -> int | None:
    if spec in ("", "byte"):
        return 258
    if _remote(spec):
        return None
    if not Path(spec).is_file():
        raise ValueError(
            f"data.tokenizer={spec!r} does not exist; expected 'byte' or a tokenizer.json file"
        )
    from tokenizers import Tokenizer

    return Tokenizer.from_file(spec).get_vocab_size()


def _check_shard_path(path: str, eval_fraction: float = 0.0) -> int | None:
    """A shard pattern's files, or the dataset's index.json, exist; returns its vocab_size."""
    if ".tar" in path and not path.endswith(".json"):
        import braceexpand

        files = [f for part in path.split(",") if part for f in braceexpand.braceexpand(part)]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ValueError(
                f"data.path={path!r}: {len(missing)} of {len(files)} shard file(s) do not exist "
                f"(first: {missing[0]!r})"
            )
        return None
    index = Path(path) if path.endswith(".json") else Path(path) / "index.json"
    if not index.is_file():
        raise ValueError(
            f"data.path={path!r}: {index} does not exist; expected a directory written by "
            "`mnemo data text`, its index.json, or a shard pattern like "
            "DIR/shard-{000000..000009}.tar"
        )
    try:
        meta = json.loads(index.read_text())
        vocab, shards = meta.get("vocab_size"), len(meta.get("shards") or [])
    except (json.JSONDecodeError, AttributeError, TypeError):
        return None  # the reader names what is wrong with it
    if eval_fraction > 0 and shards and math.ceil(eval_fraction * shards) >= shards:
        raise ValueError(
            f"data.eval_fraction={eval_fraction} holds out all {shards} shard(s) of {index}, "
            "leaving none to train on; expected a smaller fraction or a dataset written in more "
            "shards (mnemo data text --shard-size)"
        )
    return vocab if isinstance(vocab, int) else None


# ---------------------------------------------------------------------------------------------
# Overrides: "a.b=c" strings, coerced to the field's declared type.

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, raw: Any, tp: Any) -> Any:
    """Turn `raw` (usually a CLI string) into `tp`, or raise naming the key and the type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None
        return _coerce(key, raw, args[0])
    if not isinstance(raw, str):
        if tp is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if tp in (int, float, str, bool) and not isinstance(raw, tp):
            raise ValueError(f"{key}={raw!r}: expected {tp.__name__}")
        return raw
    try:
        if tp is bool:
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(float(raw)) if ("e" in raw.lower() and float(raw).is_integer()) else int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        if origin in (dict, list, tuple) or tp in (dict, list):
            return json.loads(raw)
    except (ValueError, json.JSONDecodeError):
        name = getattr(tp, "__name__", str(tp))
        raise ValueError(f"{key}={raw!r}: expected a value of type {name}") from None
    return _parse_literal(raw)


def _parse_literal(raw: str) -> Any:
    """Free-form values (model args): JSON if it parses, else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        low = raw.lower()
        if low in ("true", "false"):
            return low == "true"
        return raw


def _set_path(cls: type, d: dict[str, Any], key: str, raw: Any, full: str) -> None:
    """Set dotted `key` in `d` (the dict form of dataclass `cls`), coercing to the field type.

    Values are checked for type here; cross-field rules (__post_init__) run once all
    overrides are in, so `--set data.source=shards --set data.path=DIR` works in any order.
    """
    head, _, rest = key.partition(".")
    names = [f.name for f in fields(cls)]
    if head not in names:
        raise ValueError(f"unknown config key {full!r}; allowed here: {', '.join(names)}")
    tp = typing.get_type_hints(cls)[head]
    if rest:
        if is_dataclass(tp):
            _set_path(tp, d[head], rest, raw, full)
        elif isinstance(d[head], dict):
            d[head] = dict(d[head])
            _set_dict(d[head], rest, raw)
        else:
            raise ValueError(f"config key {full!r}: {head!r} is a value, not a section")
    else:
        if is_dataclass(tp):
            raise ValueError(f"config key {full!r} names a section; set one of its fields instead")
        d[head] = _coerce(full, raw, tp)


def _set_dict(d: dict, key: str, raw: Any) -> None:
    head, _, rest = key.partition(".")
    if rest:
        sub = d.setdefault(head, {})
        if not isinstance(sub, dict):
            raise ValueError(f"config key {key!r}: {head!r} is not a mapping")
        _set_dict(sub, rest, raw)
    else:
        d[head] = _parse_literal(raw) if isinstance(raw, str) else raw


def apply_overrides(cfg: JobConfig, overrides: list[str] | dict[str, Any]) -> JobConfig:
    """Apply `["a.b=c", ...]` (or a dict) in order, then validate the result as a whole."""
    items = overrides.items() if isinstance(overrides, dict) else map(_split_override, overrides)
    d = cfg.to_dict()
    for key, raw in items:
        _set_path(JobConfig, d, key, raw, key)
    return from_dict(d)


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
    return key.strip(), value


def from_dict(d: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from `to_dict()` output (e.g. config.json), validating every field."""
    return _from_dict(JobConfig, d, "")


def _from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise ValueError(
            f"unknown config key(s) {[prefix + b for b in bad]}; allowed: {sorted(names)}"
        )
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if is_dataclass(tp):
            kwargs[k] = _from_dict(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(prefix + k, v, tp)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Presets: functions returning a JobConfig, registered per recipe by the launch/ files.

PresetFn = Callable[[], JobConfig]
_PRESETS: dict[str, dict[str, PresetFn]] = {}


def preset(recipe: str, name: str) -> Callable[[PresetFn], PresetFn]:
    """Decorator registering `fn` as preset `name` of `recipe`."""

    def deco(fn: PresetFn) -> PresetFn:
        _PRESETS.setdefault(recipe, {})[name] = fn
        return fn

    return deco


def presets(recipe: str) -> list[str]:
    return sorted(_PRESETS.get(recipe, {}))


def load(recipe: str, preset_name: str, overrides: list[str] | None = None) -> JobConfig:
    """The preset's config with overrides applied; errors list the known presets."""
    table = _PRESETS.get(recipe, {})
    if preset_name not in table:
        raise ValueError(
            f"recipe {recipe!r} has no preset {preset_name!r}; known: {sorted(table) or 'none'}"
        )
    cfg = table[preset_name]()
    cfg = dataclasses.replace(cfg, recipe=recipe, preset=preset_name)
    return apply_overrides(cfg, overrides or [])


def smoke_base() -> JobConfig:
    """The laptop-sized base every recipe's smoke preset builds on: 2 CPU workers, < 2 min."""
    return JobConfig(
        train=TrainConfig(steps=60, seq_len=128, batch_tokens=2048, micro_batch=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        scaling=ScalingConfig(workers=2, strategy="ddp"),
        log=LogConfig(every=10),
        eval=EvalConfig(every=0, batches=2),
    )
