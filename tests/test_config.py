"""Typed config: every shipped YAML loads; overrides are type-checked; errors name key, value and file.

train.py --print-config / bad overrides are run as subprocesses (with PYTHONPATH set to the repo).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastflow.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# The course's full config (Configuration System section of the course guide), wandb block included.
COURSE_YAML = """
data:
  dataset: "celeba"
  root: /path/to/celeba-subset
  from_hub: false
  repo_name: "electronickale/cmu-10799-celeba64-subset"
  image_size: 64
  channels: 3
  num_workers: 4
  pin_memory: true
  augment: true
model:
  base_channels: 128
  channel_mult: [1, 2, 2, 4]
  num_res_blocks: 2
  attention_resolutions: [16, 8]
  num_heads: 4
  dropout: 0.1
  use_scale_shift_norm: true
training:
  batch_size: 128
  learning_rate: 0.0002
  weight_decay: 0.0001
  betas: [0.9, 0.999]
  ema_decay: 0.9999
  ema_start: 10000
  gradient_clip_norm: 1.0
  num_iterations: 80000
  log_every: 100
  sample_every: 1000
  save_every: 5000
  num_samples: 16
ddpm:
  num_timesteps: 1000
  beta_start: 0.0001
  beta_end: 0.02
flow_matching:
  num_timesteps: 1000
  sigma_min: 0.0001
flow_map_matching:
  num_timesteps: 1000
  sigma_min: 0.0001
  annealing_schedule: "linear"
  initial_gap: 0.1
  warmup_steps: 30000
  reconstruction_weight: 0.5
sampling:
  num_steps: 20
  batch_size: 16
infrastructure:
  seed: 42
  device: "cuda"
  num_gpus: 2
  mixed_precision: true
  compile_model: false
checkpoint:
  dir: "./checkpoints"
  resume: null
logging:
  dir: "./logs"
  wandb:
    enabled: true
    project: "cmu-10799-diffusion"
    entity: null
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------ files
@pytest.mark.parametrize("path", CONFIGS or [pytest.param(None, marks=pytest.mark.skip(reason="no configs/*.yaml"))],
                         ids=lambda p: p.name if p else "none")
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.method == raw.get("method", Config().method)
    # every value written in the file is the value in the config (after int → float coercion)
    resolved = config_to_dict(cfg)
    for section, values in raw.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if section == "logging" and key == "wandb":
                continue
            assert resolved[section][key] == value, f"{path.name}: {section}.{key}"


def test_course_config_loads_and_drops_wandb(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, COURSE_YAML))
    assert cfg.data.root == "/path/to/celeba-subset" and cfg.infrastructure.num_gpus == 2
    assert cfg.model.channel_mult == [1, 2, 2, 4] and cfg.training.betas == [0.9, 0.999]
    assert not hasattr(cfg.logging, "wandb")


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.method == "flow_map_matching"
    assert (cfg.model.base_channels, cfg.model.channel_mult, cfg.model.num_res_blocks) == (128, [1, 2, 2, 4], 2)
    assert cfg.model.attention_resolutions == [16, 8] and cfg.model.use_scale_shift_norm is True
    assert (cfg.training.batch_size, cfg.training.learning_rate, cfg.training.betas) == (128, 2e-4, [0.9, 0.999])
    assert (cfg.ddpm.num_timesteps, cfg.ddpm.beta_start, cfg.ddpm.beta_end) == (1000, 1e-4, 0.02)
    assert (cfg.flow_map_matching.initial_gap, cfg.flow_map_matching.warmup_steps) == (0.1, 30000)
    assert cfg.flow_map_matching.reconstruction_weight == 0.5 and cfg.sampling.num_steps == 20
    # defaults are independent objects (no shared mutable lists)
    other = Config()
    other.model.channel_mult.append(8)
    assert Config().model.channel_mult == [1, 2, 2, 4]
    assert config_from_dict(config_to_dict(cfg)) == cfg


# ------------------------------------------------------------------------------ overrides
def test_override_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.batch_size=abc"])
    assert "training.batch_size" in str(err.value) and "abc" in str(err.value)
    for bad in ["training.batch_size=1.5", "training.batch_size=true", "model.use_scale_shift_norm=3",
                "model.channel_mult=[1, 2.5]", "data.dataset=5"]:
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])


def test_a_boolean_for_a_choice_lists_the_choices() -> None:
    """`compile: true` (YAML reads it as a boolean) names the key, the choices and why."""
    with pytest.raises(ConfigError, match=r"infrastructure\.compile = True is not one of none, block, step \(YAML reads"):
        load_config(None, ["infrastructure.compile=true"])
    with pytest.raises(ConfigError, match=r"infrastructure\.parallelism = 3 is not one of none, ddp, fsdp$"):
        load_config(None, ["infrastructure.parallelism=3"])


@pytest.mark.parametrize("bad", [
    "training.gradient_clip_norm=0", "training.gradient_clip_norm=-1", "training.learning_rate=.nan",
    "training.learning_rate=-1e-4", "training.ema_decay=1.5", "training.ema_decay=1", "training.betas=[0.9, 1.5]",
    "model.dropout=2", "training.num_samples=0", "data.num_workers=-1", "sampling.eta=-3", "sampling.eta=1.5",
    "ddpm.beta_end=1.2", "flow_map_matching.sigma_min=0.5", "flow_map_matching.reconstruction_weight=.inf",
    "logging.profile_active=0", "model.channel_mult=[1, 0, 2]", "model.channel_mult=[-1]",
    "flow_map_matching.fd_step=.nan", "flow_map_matching.fd_step=.inf", "flow_map_matching.fd_step=0",
    "flow_map_matching.fd_step=-1e-4", "flow_map_matching.fd_step=0.5",
])
def test_out_of_range_values_name_key_and_value(bad: str) -> None:
    key, value = bad.split("=")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} = .*expected"):
        load_config(None, [bad])


def test_range_edges_that_mean_something_are_accepted() -> None:
    cfg = load_config(None, ["training.gradient_clip_norm=.inf", "training.ema_decay=0", "model.dropout=0",
                             "data.num_workers=0", "sampling.eta=0", "flow_map_matching.sigma_min=0"])
    assert math.isinf(cfg.training.gradient_clip_norm)
    with pytest.raises(ConfigError, match="beta_start=0.1 must not exceed ddpm.beta_end=0.02"):
        load_config(None, ["ddpm.beta_start=0.1"])


@pytest.mark.parametrize("method", ["ddpm", "ddpm_x0"])
def test_ddpm_sampling_steps_cannot_exceed_its_timesteps(method: str) -> None:
    """The training-time grids sample DDPM with DDIM at sampling.num_steps: more steps than
    timesteps would fail at the first grid, after the run had trained for sample_every steps."""
    with pytest.raises(ConfigError, match=r"sampling.num_steps=20 exceeds ddpm.num_timesteps=10"):
        load_config(None, [f"method={method}", "ddpm.num_timesteps=10", "sampling.num_steps=20"])
    assert load_config(None, [f"method={method}", "ddpm.num_timesteps=20", "sampling.num_steps=20"])
    # other methods do not read ddpm.*
    assert load_config(None, ["method=flow_matching", "ddpm.num_timesteps=10", "sampling.num_steps=20"])


@pytest.mark.parametrize("given", ["data.root=/data/celeba64", "data.from_hub=true"])
def test_digits_with_a_data_source_is_an_error(given: str) -> None:
    """Without it, data.root=... on a digits config trained on the digits, silently."""
    with pytest.raises(ConfigError, match=rf"{re.escape(given)} is ignored by data.dataset=digits"):
        load_config(None, ["data.dataset=digits", given])
    load_config(None, ["data.dataset=folder", "data.root=/data/celeba64"])


def test_override_coercions() -> None:
    cfg = load_config(None, ["training.learning_rate=1", "model.channel_mult=[1,2]", "training.betas=[0, 0]",
                             "checkpoint.resume=null", "model.dropout=0", "sampling.eta=1"])
    assert cfg.training.learning_rate == 1.0 and type(cfg.training.learning_rate) is float
    assert cfg.model.channel_mult == [1, 2] and all(type(m) is int for m in cfg.model.channel_mult)
    assert cfg.training.betas == [0.0, 0.0] and all(type(b) is float for b in cfg.training.betas)
    assert cfg.checkpoint.resume is None and type(cfg.model.dropout) is float and type(cfg.sampling.eta) is float
    cfg = load_config(None, ["checkpoint.resume=runs/x/ckpt.pt", "training.batch_size=7.0"])
    assert cfg.checkpoint.resume == "runs/x/ckpt.pt" and cfg.training.batch_size == 7


def test_override_list_given_a_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.channel_mult=3"])
    assert "model.channel_mult" in str(err.value) and "3" in str(err.value)


def test_override_float_in_exponent_notation() -> None:
    assert load_config(None, ["training.learning_rate=1e-4"]).training.learning_rate == 1e-4


def test_yaml_float_in_exponent_notation(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  learning_rate: 2e-4\nddpm:\n  beta_start: 1e-4\n")
    cfg = load_config(path)
    assert cfg.training.learning_rate == 2e-4 and cfg.ddpm.beta_start == 1e-4


def test_unknown_override_key_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.batch_sise=4"])
    assert "training.batch_sise" in str(err.value) and "batch_sise" in str(err.value)
    with pytest.raises(ConfigError, match="nosection"):
        load_config(None, ["nosection.x=1"])
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["model=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["training.batch_size"])


def test_invalid_choice_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["flow_map_matching.derivative=foo"])
    message = str(err.value)
    assert "flow_map_matching.derivative" in message and "foo" in message
    for choice in ("jvp", "finite_difference", "dual"):
        assert choice in message
    with pytest.raises(ConfigError, match="ddpm_x0"):
        load_config(None, ["method=ddim"])


def test_overrides_are_validated_after_applying() -> None:
    with pytest.raises(ConfigError, match="training.batch_size"):
        load_config(None, ["training.batch_size=0"])
    with pytest.raises(ConfigError, match="num_groups"):
        load_config(None, ["model.base_channels=100"])  # 100 % 32 ≠ 0
    cfg = apply_overrides(Config(), ["model.base_channels=96"])
    assert cfg.model.base_channels == 96


# ------------------------------------------------------------------------------ YAML errors
def test_unknown_key_in_yaml_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  base_channels: 64\n  chanel_mult: [1, 2]\n", "typo.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.chanel_mult" in str(err.value) and str(path) in str(err.value)
    path = write(tmp_path, "modle:\n  base_channels: 64\n", "section.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "modle" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_in_yaml_names_key_value_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "training.batch_size" in str(err.value) and "lots" in str(err.value) and str(path) in str(err.value)


def test_invalid_choice_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "sampling:\n  solver: rk4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert all(word in str(err.value) for word in ("sampling.solver", "rk4", "euler", "midpoint", "heun", str(path)))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "missing.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(missing)
    assert str(missing) in str(err.value)


def test_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(write(tmp_path, "model: [1, 2\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))


# ------------------------------------------------------------------------------ train.py CLI
def test_train_print_config(tmp_path: Path) -> None:
    path = CONFIGS[0] if CONFIGS else write(tmp_path, "method: ddpm\n")
    result = run_train("--config", str(path), "--print-config", "training.batch_size=3", "model.channel_mult=[1,2]")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    expected = config_to_dict(load_config(path, ["training.batch_size=3", "model.channel_mult=[1,2]"]))
    assert printed == expected
    assert printed["training"]["batch_size"] == 3


def test_train_bad_override_exits_2_with_the_message(tmp_path: Path) -> None:
    path = CONFIGS[0] if CONFIGS else write(tmp_path, "method: ddpm\n")
    result = run_train("--config", str(path), "--print-config", "training.batch_size=abc")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "training.batch_size" in result.stderr and "abc" in result.stderr
    assert result.stdout == ""
    result = run_train("--config", str(tmp_path / "missing.yaml"), "--print-config")
    assert result.returncode == 2 and "missing.yaml" in result.stderr
