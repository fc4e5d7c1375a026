"""Training configuration: one JSON (or YAML) file, validated key by key.

Top-level keys are the fields of :class:`TrainConfig`; ``optimizer`` holds :class:`OptimizerConfig`;
``task_options`` is validated by the task's own ``Options`` dataclass. ``--set a.b=value`` overrides
any key (value parsed as JSON, else taken as a string). Any unknown key is one error naming it.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration that cannot be used as written."""


PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up, then constant or cosine decay to ``lr * min_lr_ratio``."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    task: str                            # registered task name, or "package.module:ClassName"
    task_options: dict = field(default_factory=dict)
    out_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000                    # optimizer steps
    batch_size: int = 8                  # per process, per micro-batch
    grad_accum: int = 1                  # micro-batches per optimizer step
    grad_clip: float = 1.0               # max global grad norm; 0 disables clipping
    precision: str = "fp32"              # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    ema_decay: float = 0.0               # 0 disables EMA weights
    compile: bool = False                # torch.compile the model in place
    activation_checkpointing: bool = False
    parallel: str = "ddp"                # under torchrun: ddp, or fsdp (fully_shard) for big models
    device: str = "auto"                 # auto | cpu | cuda
    log_every: int = 10
    ckpt_every: int = 500                # 0: only at the end
    keep_checkpoints: int = 2
    sample_every: int = 0                # 0: no sample grids
    prefetch: int = 2                    # micro-batches prepared ahead on a background thread; 0: inline
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self):
        checks = [
            ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"), ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"), ("log_every", self.log_every >= 1, ">= 1"),
            ("ckpt_every", self.ckpt_every >= 0, ">= 0"), ("sample_every", self.sample_every >= 0, ">= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"), ("prefetch", self.prefetch >= 0, ">= 0"),
            ("optimizer.lr", self.optimizer.lr > 0, "> 0"),
            ("optimizer.warmup_steps", self.optimizer.warmup_steps >= 0, ">= 0"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise ConfigError(f"config key {key!r} must be {want}")
        for key, value, allowed in [("precision", self.precision, PRECISIONS), ("parallel", self.parallel, PARALLEL),
                                    ("device", self.device, ("auto", "cpu", "cuda")),
                                    ("optimizer.schedule", self.optimizer.schedule, LR_SCHEDULES)]:
            if value not in allowed:
                raise ConfigError(f"config key {key!r} is {value!r}; use one of {', '.join(allowed)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, annotation, key: str):
    """Check ``value`` against a dataclass field type (int, float, bool, str, tuple, dict, Literal-free)."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false; got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer; got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number; got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string; got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key {key!r} must be a list of {len(args)} values; got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list; got {value!r}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping; got {value!r}")
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, prefix=key + ".")
    raise ConfigError(f"config key {key!r} has an unsupported type {annotation!r}")


def build_dataclass(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a plain dict, naming the first unknown or ill-typed key."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping; got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {prefix + key!r}; known keys{' under ' + repr(prefix.rstrip('.')) if prefix else ''}: {known}")
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config key {prefix + missing[0]!r} is required")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: {exc}") from exc


def parse_override(text: str) -> tuple[list[str], object]:
    """``"optimizer.lr=3e-4"`` -> (["optimizer", "lr"], 0.0003); values parse as JSON, else as strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key=value (e.g. --set optimizer.lr=3e-4)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r}: {key!r} is not a key path like optimizer.lr")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{str(path)!r} is YAML but PyYAML is not installed; pip install pyyaml or use JSON") from exc
        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = (), raw: dict | None = None) -> TrainConfig:
    """Read a config file (or take ``raw``), apply ``--set`` overrides, validate."""
    base = read_config_file(path) if path is not None else (raw or {})
    return build_dataclass(TrainConfig, apply_overrides(base, list(overrides)))
