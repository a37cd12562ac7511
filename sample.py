#!/usr/bin/env python
"""Draw samples from a trained checkpoint.

    python sample.py --checkpoint runs/fmm-digits --method FlowMapMatching --num_steps 8 --use_ema --output fmm.png
    python sample.py --checkpoint ckpt.pt --method DDIM --num_steps 100 --eta 0.0 --output samples.npz

--output *.png writes a grid; *.npz writes the raw samples as uint8 `images` of shape (N, H, W, C).
--checkpoint takes a checkpoint file, a run folder (its latest checkpoint) or an exported EMA file.

Sample i starts from noise that is a function of (--seed, i) alone, drawn on the CPU: the
deterministic samplers (DDIM with --eta 0, FlowMatching, FlowMapMatching) give the same images for
any --batch_size and on any device (up to its arithmetic); the stochastic ones (DDPM, DDIM with
--eta > 0) for a given --seed and --batch_size.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastflow.config import ConfigError, config_from_dict
from fastflow.methods import CLI_NAMES, create_method_from_config
from fastflow.train.checkpoint import CheckpointError, load_checkpoint, strip_module_prefix

METHOD_CHOICES = sorted(CLI_NAMES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--method", required=True, choices=METHOD_CHOICES)
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--num_steps", type=int, default=None, help="sampling steps (DDPM ignores it: T steps)")
    p.add_argument("--eta", type=float, default=None, help="DDIM stochasticity in [0, 1] (default: the checkpoint config's sampling.eta, 0 = deterministic)")
    p.add_argument("--solver", default=None, choices=["euler", "midpoint", "heun"], help="FlowMatching ODE solver")
    p.add_argument("--use_ema", action="store_true", help="sample with the EMA weights")
    p.add_argument("--output", default="samples.png", help=".png grid or .npz raw uint8 (N, H, W, C)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per sampler call (default: the checkpoint config's sampling.batch_size)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = p.parse_args(argv)
    for name in ("num_samples", "batch_size", "num_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1, got {value}")
    if args.eta is not None and not (math.isfinite(args.eta) and 0 <= args.eta <= 1):
        # above 1, σ² exceeds the step's noise budget 1 − ᾱ_prev: no longer the DDIM family
        p.error(f"--eta must be a number in [0, 1], got {args.eta}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    # Checked before sampling, not after: a long run must not end in an unwritable path.
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".npz"):
        p.error(f"--output must end in .png or .npz, got {args.output}")
    if out.is_dir():
        p.error(f"--output {args.output} is a folder; give a file name ending in .png or .npz")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--output {args.output}: cannot create its folder ({exc.strerror or exc})")
    if not os.access(out.parent, os.W_OK):
        p.error(f"--output {args.output}: folder {out.parent} is not writable")
    ignored = []
    if args.eta is not None and not args.method.startswith("DDIM"):
        ignored.append("--eta (DDIM only)")
    if args.solver is not None and args.method != "FlowMatching":
        ignored.append("--solver (FlowMatching only)")
    if args.num_steps is not None and args.method.startswith("DDPM"):
        ignored.append("--num_steps (DDPM takes every timestep; use --method DDIM for fewer)")
    for flag in ignored:
        print(f"warning: {args.method} ignores {flag}", file=sys.stderr)
    return args


def _seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed that is a function of (seed, sample index, stream) alone."""
    return ((seed * 1_000_003 + index) * 8_191 + stream) % (2**63 - 1)


def start_noise(seed: int, first: int, n: int, image_shape, device: torch.device) -> torch.Tensor:
    """The starting noise of samples ``first … first + n − 1``: sample i's is drawn from its own CPU
    generator seeded by (seed, i), so it depends on neither the batch it is in nor the device."""
    out = torch.empty((n, *image_shape))
    for j in range(n):
        out[j] = torch.randn(image_shape, generator=torch.Generator().manual_seed(_seed(seed, first + j, 0)))
    return out.to(device)


def load_method(checkpoint: str, cli_method: str, use_ema: bool, device: torch.device):
    ckpt = load_checkpoint(checkpoint, map_location="cpu", require=("config", "model"))
    config = config_from_dict(ckpt["config"], source=f"{ckpt['_path']}:config")
    wanted = CLI_NAMES[cli_method]
    if config.method != wanted:
        raise SystemExit(
            f"error: --method {cli_method} needs a {wanted} checkpoint, but {ckpt['_path']} was trained with {config.method}"
        )
    config.model.fused_kernels = config.model.fused_kernels and device.type == "cuda"
    method = create_method_from_config(config)
    state = strip_module_prefix(ckpt["model"])
    try:
        method.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt['_path']}: its weights do not fit the model its config builds ({exc})") from exc
    if use_ema:
        ema = ckpt.get("ema")
        if not isinstance(ema, dict) or not ema.get("shadow"):
            raise CheckpointError(f"{ckpt['_path']} holds no EMA weights; run without --use_ema")
        shadow = strip_module_prefix(ema["shadow"])
        params = dict(method.model.named_parameters())
        missing = set(params) - set(shadow)
        if missing:
            raise CheckpointError(f"{ckpt['_path']}: EMA weights miss {sorted(missing)[:3]} ...")
        wrong = [f"{n} {tuple(shadow[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
                 if tuple(shadow[n].shape) != tuple(p.shape)]
        if wrong:
            raise CheckpointError(f"{ckpt['_path']}: EMA weights do not fit the model its config builds: "
                                  f"{', '.join(wrong[:3])}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(shadow[name].to(p.dtype))
    return method.to(device).eval(), config


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    try:
        method, config = load_method(args.checkpoint, args.method, args.use_ema, device)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    image_shape = (config.data.channels, config.data.image_size, config.data.image_size)
    batch_size = args.batch_size or config.sampling.batch_size
    kwargs = {}
    if args.method.startswith("DDIM"):
        kwargs = {"sampler": "ddim", "num_steps": args.num_steps or 100,
                  "eta": args.eta if args.eta is not None else config.sampling.eta}
    elif args.method.startswith("DDPM"):
        kwargs = {"sampler": "ddpm"}
    elif args.method == "FlowMatching":
        kwargs = {"num_steps": args.num_steps or 100, "solver": args.solver or config.sampling.solver}
    else:
        kwargs = {"num_steps": args.num_steps or config.sampling.num_steps}
    if kwargs.get("sampler") == "ddim" and kwargs["num_steps"] > method.num_timesteps:
        given = "" if args.num_steps else " (the default)"
        print(f"error: --num_steps {kwargs['num_steps']}{given} exceeds the checkpoint's {method.num_timesteps} "
              f"timesteps (DDIM takes a subset of them)", file=sys.stderr)
        return 2

    start_key = "x_T" if args.method.startswith(("DDPM", "DDIM")) else "x_0"
    chunks = []
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, args.num_samples, batch_size):
            n = min(batch_size, args.num_samples - first)
            # the stochastic samplers' per-step noise: one stream per batch, seeded by where it starts
            generator = torch.Generator(device=device).manual_seed(_seed(args.seed, first, 1))
            noise = start_noise(args.seed, first, n, image_shape, device)
            chunk = method.sample(n, image_shape, generator=generator, **{start_key: noise}, **kwargs).float().cpu()
            bad = int((~torch.isfinite(chunk.flatten(1))).any(dim=1).sum())
            if bad:  # clamp keeps NaN and the uint8 cast turns it black: say so, write nothing
                print(f"error: {bad} of samples {first}…{first + n - 1} are not finite (NaN/inf): "
                      f"{args.checkpoint} has diverged, or --num_steps is too small for it; nothing written",
                      file=sys.stderr)
                return 2
            chunks.append(chunk.clamp(-1, 1))
    samples = torch.cat(chunks)
    seconds = time.perf_counter() - start

    from fastflow.data import save_image, to_uint8_nhwc

    out = Path(args.output)
    if out.suffix.lower() == ".npz":
        np.savez_compressed(out, images=to_uint8_nhwc(samples))
    else:
        save_image(samples, out, nrow=max(1, int(math.sqrt(args.num_samples))))
    print(f"wrote {args.num_samples} samples ({args.method}, {kwargs}) to {out} in {seconds:.1f}s "
          f"({args.num_samples / seconds:.1f} img/s on {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
