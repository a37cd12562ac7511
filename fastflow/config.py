"""One typed schema for every run: dataclasses <- YAML <- ``key.sub=value`` overrides.

The sections and names follow the course codebase (data, model, training, ddpm, flow_matching,
flow_map_matching, sampling, infrastructure, checkpoint, logging). Unknown keys and wrong types
are errors that name the key, the value and the file.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "METHOD_SECTIONS",
]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits (built-in) | folder | celeba (folder) | hub
    root: Optional[str] = None  # image folder for dataset=folder/celeba
    from_hub: bool = False
    repo_name: str = "electronickale/cmu-10799-celeba64-subset"
    image_size: int = 64
    channels: int = 3
    num_workers: int = 4
    pin_memory: bool = True
    augment: bool = True  # random horizontal flip
    on_bad_image: str = "error"  # error | skip (skipped files are counted and reported)
    loader: str = "torch"  # torch | gpu_cache | dali


@dataclass
class ModelConfig:
    base_channels: int = 128
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attention_resolutions: List[int] = field(default_factory=lambda: [16, 8])
    num_heads: int = 4
    dropout: float = 0.1
    use_scale_shift_norm: bool = True
    num_groups: int = 32
    fused_kernels: bool = False  # fastflow.ops fused Triton (CUDA) / C++ (CPU) kernels


@dataclass
class TrainingConfig:
    batch_size: int = 128  # per-process batch size
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    ema_decay: float = 0.9999
    ema_start: int = 10000
    gradient_clip_norm: float = 1.0
    num_iterations: int = 80000
    log_every: int = 100
    sample_every: int = 1000
    save_every: int = 5000
    num_samples: int = 16  # grid size for training samples


@dataclass
class DDPMConfig:
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class FlowMatchingConfig:
    num_timesteps: int = 1000
    sigma_min: float = 1e-4


@dataclass
class FlowMapMatchingConfig:
    num_timesteps: int = 1000
    sigma_min: float = 1e-4
    annealing_schedule: str = "linear"  # linear | cosine | none
    initial_gap: float = 0.1
    warmup_steps: int = 30000
    reconstruction_weight: float = 0.5  # λ in Prop. 3.11
    derivative: str = "dual"  # jvp | finite_difference | dual
    derivative_grad: bool = True  # False: stop the gradient through ∂_t v (MeanFlow-style)
    # float32 | autocast: where jvp and finite_difference run under bf16/fp16 autocast (float32:
    # autocast off for them). dual always follows the autocast: its bf16 ∂_t v (2-3% off) is as
    # accurate as bf16's own v (docs/derivative.md), and it keeps the tensor cores.
    derivative_precision: str = "float32"
    fd_step: float = 5e-5  # h of the central difference in t ∈ [0, 1]; float32 optimum, docs/derivative.md


@dataclass
class SamplingConfig:
    num_steps: int = 20
    batch_size: int = 16  # images per sampler call: the training grids, and sample.py's default --batch_size
    eta: float = 0.0  # DDIM
    solver: str = "euler"  # FlowMatching: euler | midpoint | heun


@dataclass
class InfrastructureConfig:
    seed: int = 42
    device: str = "auto"  # auto | cuda | cpu
    num_gpus: int = 1  # informational: torchrun sets the world size
    mixed_precision: bool = True
    precision: str = "bf16"  # bf16 | fp16 (GradScaler) | fp32; used when mixed_precision
    compile_model: bool = False  # course name: compile: block when compile is none; compile wins otherwise
    compile: str = "none"  # none | block | step
    compile_mode: str = "default"  # torch.compile mode
    parallelism: str = "none"  # none | ddp | fsdp
    reshard_after_forward: bool = True  # FSDP2
    channels_last: bool = False


@dataclass
class CheckpointConfig:
    dir: str = "./checkpoints"
    resume: Optional[str] = None
    keep_last: int = 3


@dataclass
class LoggingConfig:
    dir: str = "./logs"
    run_name: Optional[str] = None  # default: <method>-<timestamp>
    tensorboard: bool = True
    progress_bar: bool = True
    profile: bool = False  # torch.profiler traces into <run>/profile
    profile_wait: int = 2
    profile_warmup: int = 2
    profile_active: int = 3
    # CUDA: record allocation stacks so the OOM snapshot (<run>/oom_snapshot_rank*.pickle) shows
    # where memory went; on whenever `profile` is. Costs a little per allocation.
    memory_history: bool = False


@dataclass
class Config:
    method: str = "flow_map_matching"  # ddpm | ddpm_x0 | flow_matching | flow_map_matching
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    flow_map_matching: FlowMapMatchingConfig = field(default_factory=FlowMapMatchingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    infrastructure: InfrastructureConfig = field(default_factory=InfrastructureConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def method_section(self) -> Any:
        """The hyperparameter section of this config's method (ddpm_x0 shares ``ddpm``)."""
        return getattr(self, METHOD_SECTIONS[self.method])


METHOD_SECTIONS = {
    "ddpm": "ddpm",
    "ddpm_x0": "ddpm",
    "flow_matching": "flow_matching",
    "flow_map_matching": "flow_map_matching",
}

# Accepted values of string-valued choices, checked after every load/override.
_CHOICES: Dict[str, Sequence[str]] = {
    "method": tuple(METHOD_SECTIONS),
    "data.dataset": ("digits", "folder", "celeba", "hub"),
    "data.on_bad_image": ("error", "skip"),
    "data.loader": ("torch", "gpu_cache", "dali"),
    "flow_map_matching.annealing_schedule": ("linear", "cosine", "none"),
    "flow_map_matching.derivative": ("jvp", "finite_difference", "dual"),
    "flow_map_matching.derivative_precision": ("float32", "autocast"),
    "sampling.solver": ("euler", "midpoint", "heun"),
    "infrastructure.device": ("auto", "cuda", "cpu"),
    "infrastructure.precision": ("bf16", "fp16", "fp32"),
    "infrastructure.compile": ("none", "block", "step"),
    "infrastructure.parallelism": ("none", "ddp", "fsdp"),
}


def _finite(x: float) -> bool:
    return math.isfinite(x)


# Numeric ranges, checked after every load/override (NaN fails every one): (key, test, expected).
_RANGES: Sequence[Tuple[str, Callable[[Any], bool], str]] = (
    ("training.learning_rate", lambda x: _finite(x) and x > 0, "a finite number > 0"),
    ("training.weight_decay", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("training.betas", lambda x: 0 <= x < 1, "two numbers in [0, 1)"),
    ("training.ema_decay", lambda x: 0 <= x < 1, "a number in [0, 1)"),
    ("training.ema_start", lambda x: x >= 0, "an iteration >= 0"),
    ("training.gradient_clip_norm", lambda x: x > 0,
     "a number > 0 (.inf for no clipping; 0 would zero every update, a negative one reverse it)"),
    ("training.num_samples", lambda x: x >= 1, "at least 1"),
    ("model.dropout", lambda x: 0 <= x < 1, "a probability in [0, 1)"),
    ("model.channel_mult", lambda x: x >= 1, "channel multipliers >= 1 (one per resolution level)"),
    ("data.num_workers", lambda x: x >= 0, "0 (load in the training process) or more worker processes"),
    ("ddpm.num_timesteps", lambda x: x >= 1, "at least 1"),
    ("ddpm.beta_start", lambda x: 0 < x < 1, "a number in (0, 1)"),
    ("ddpm.beta_end", lambda x: 0 < x < 1, "a number in (0, 1)"),
    ("flow_matching.num_timesteps", lambda x: x >= 1, "at least 1"),
    ("flow_matching.sigma_min", lambda x: 0 <= x < 0.5, "a number in [0, 0.5)"),
    ("flow_map_matching.num_timesteps", lambda x: x >= 1, "at least 1"),
    ("flow_map_matching.sigma_min", lambda x: 0 <= x < 0.5, "a number in [0, 0.5)"),
    ("flow_map_matching.warmup_steps", lambda x: x >= 0, "an iteration count >= 0"),
    ("flow_map_matching.fd_step", lambda x: _finite(x) and 0 < x < 0.5,
     "a finite step in (0, 0.5) (the central difference evaluates t ± fd_step in [0, 1])"),
    ("flow_map_matching.reconstruction_weight", lambda x: _finite(x) and x >= 0, "a finite number >= 0"),
    ("sampling.eta", lambda x: 0 <= x <= 1, "a number in [0, 1] (0: deterministic DDIM; above 1 σ² exceeds a step's noise budget)"),
    ("logging.profile_wait", lambda x: x >= 0, "a step count >= 0"),
    ("logging.profile_warmup", lambda x: x >= 0, "a step count >= 0"),
    ("logging.profile_active", lambda x: x >= 1, "a step count >= 1"),
)


# ----------------------------------------------------------------------------------- coercion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float etc.)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin in (list, List, tuple, Tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list of {_type_name(args[0])}, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if key in _CHOICES:
            hint = " (YAML reads true/false/yes/no/on/off as booleans)" if isinstance(value, bool) else ""
            raise ConfigError(f"{source}: {key} = {value!r} is not one of {', '.join(_CHOICES[key])}{hint}")
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _fields(cls: Any) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _fill(obj: Any, data: Dict[str, Any], prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    fields = _fields(type(obj))
    for key, value in data.items():
        full = prefix + key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key {full!r} (known keys here: {known})")
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            _fill(getattr(obj, key), value, full + ".", source)
        else:
            setattr(obj, key, _coerce(value, tp, full, source))


def _validate(cfg: Config, source: str) -> None:
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{source}: {key} = {value!r} is not one of {', '.join(choices)}")
    positive = [
        "data.image_size", "data.channels", "model.base_channels", "model.num_res_blocks",
        "model.num_heads", "model.num_groups", "training.batch_size", "training.num_iterations",
        "training.log_every", "training.sample_every", "training.save_every", "sampling.num_steps",
        "sampling.batch_size", "checkpoint.keep_last",
    ]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{source}: {key} must be positive, got {_get(cfg, key)!r}")
    for key, ok, expected in _RANGES:
        value = _get(cfg, key)
        if isinstance(value, list):
            good = all(ok(v) for v in value)
        else:
            good = ok(value)
        if not good:
            raise ConfigError(f"{source}: {key} = {value!r}: expected {expected}")
    data = cfg.data
    if data.dataset == "digits" and (data.root is not None or data.from_hub):
        given = f"data.root={data.root}" if data.root is not None else "data.from_hub=true"
        raise ConfigError(
            f"{source}: {given} is ignored by data.dataset=digits (the built-in digits): set "
            f"data.dataset=folder (or celeba) to train on it, or drop {given.split('=')[0]}"
        )
    if not cfg.ddpm.beta_start <= cfg.ddpm.beta_end:
        raise ConfigError(f"{source}: ddpm.beta_start={cfg.ddpm.beta_start} must not exceed "
                          f"ddpm.beta_end={cfg.ddpm.beta_end}")
    if len(cfg.training.betas) != 2:
        raise ConfigError(f"{source}: training.betas must have two entries, got {cfg.training.betas!r}")
    if cfg.model.base_channels % cfg.model.num_groups != 0:
        raise ConfigError(
            f"{source}: model.base_channels={cfg.model.base_channels} must be divisible by "
            f"model.num_groups={cfg.model.num_groups}"
        )
    levels = len(cfg.model.channel_mult)
    if levels == 0 or cfg.data.image_size % (2 ** (levels - 1)) != 0:
        raise ConfigError(
            f"{source}: data.image_size={cfg.data.image_size} must be divisible by 2^(len(model.channel_mult) - 1)"
            f" = {2 ** max(levels - 1, 0)} (model.channel_mult={cfg.model.channel_mult})"
        )
    fmm = cfg.flow_map_matching
    if not 0.0 < fmm.initial_gap <= 1.0:
        raise ConfigError(f"{source}: flow_map_matching.initial_gap must be in (0, 1], got {fmm.initial_gap!r}")
    if cfg.method in ("ddpm", "ddpm_x0") and cfg.sampling.num_steps > cfg.ddpm.num_timesteps:
        # the training-time grids sample with DDIM at sampling.num_steps (capped at 100)
        raise ConfigError(
            f"{source}: sampling.num_steps={cfg.sampling.num_steps} exceeds ddpm.num_timesteps="
            f"{cfg.ddpm.num_timesteps}: DDIM takes at most one step per training timestep"
        )


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------- public API
def config_from_dict(data: Dict[str, Any], source: str = "<dict>") -> Config:
    cfg = Config()
    _fill(cfg, data or {}, "", source)
    _validate(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: Dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
        if "logging" in data and isinstance(data["logging"], dict):
            data["logging"].pop("wandb", None)  # course configs: wandb is replaced by TensorBoard
    cfg = config_from_dict(data, source)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML) with type checks."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        parts = key.split(".")
        obj = cfg
        for i, part in enumerate(parts):
            fields = _fields(type(obj))
            if part not in fields:
                where = ".".join(parts[:i]) or "<root>"
                raise ConfigError(
                    f"override {item!r}: unknown key {key!r} ({part!r} is not in {where}; "
                    f"known: {', '.join(sorted(fields))})"
                )
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(fields[part]):
                    raise ConfigError(f"override {item!r}: {key!r} is a section; set one of its keys")
                setattr(obj, part, _coerce(value, fields[part], key, f"override {item!r}"))
            else:
                obj = getattr(obj, part)
                if not dataclasses.is_dataclass(obj):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])!r} is not a section")
    _validate(cfg, "overrides" if overrides else "config")
    return cfg
