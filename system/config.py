"""Job configuration: nested dataclasses, presets as functions, `--set a.b=c` overrides.

Why dataclasses and not YAML: a typo in a key or a wrong type fails at load time with the key
named, before a cluster is asked for (torchtitan's habit, STYLE.md 5).
"""

from __future__ import annotations

import dataclasses
import json
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

    def __post_init__(self) -> None:
        _check_choice("data", "source", self.source, ("passkey", "niah", "text", "shards"))
        _check_choice("data", "on_error", self.on_error, ("raise", "skip"))
        _check_positive("data", "num_workers", self.num_workers, allow_zero=True)
        if self.source in ("text", "shards") and not self.path:
            raise ValueError(f"data.path is empty; data.source={self.source!r} needs a path")
        if not (-1.0 <= self.depth <= 1.0):
            raise ValueError(f"data.depth={self.depth!r}; expected a fraction in [0, 1] or -1")


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


@dataclass(kw_only=True)
class LogConfig:
    every: int = 10

    def __post_init__(self) -> None:
        _check_positive("log", "every", self.every)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


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
