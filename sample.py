#!/usr/bin/env python
"""Draw samples from a trained checkpoint.

    python sample.py --checkpoint runs/fmm-digits --method FlowMapMatching --num_steps 8 --use_ema --output fmm.png
    python sample.py --checkpoint ckpt.pt --method DDIM --num_steps 100 --eta 0.0 --output samples.npz

--output *.png writes a grid; *.npz writes the raw samples as uint8 `images` of shape (N, H, W, C).
--checkpoint takes a checkpoint file, a run folder (its latest checkpoint) or an exported EMA file.
"""

from __future__ import annotations

import argparse
import math
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
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--solver", default=None, choices=["euler", "midpoint", "heun"], help="FlowMatching ODE solver")
    p.add_argument("--use_ema", action="store_true", help="sample with the EMA weights")
    p.add_argument("--output", default="samples.png", help=".png grid or .npz raw uint8 (N, H, W, C)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = p.parse_args(argv)
    for name in ("num_samples", "batch_size", "num_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1, got {value}")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        p.error(f"--eta must be a finite number >= 0, got {args.eta}")
    if Path(args.output).suffix.lower() not in (".png", ".npz"):  # before sampling, not after
        p.error(f"--output must end in .png or .npz, got {args.output}")
    return args


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
        if not ema:
            raise CheckpointError(f"{ckpt['_path']} holds no EMA weights; run without --use_ema")
        shadow = strip_module_prefix(ema["shadow"])
        params = dict(method.model.named_parameters())
        missing = set(params) - set(shadow)
        if missing:
            raise CheckpointError(f"{ckpt['_path']}: EMA weights miss {sorted(missing)[:3]} ...")
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
    kwargs = {}
    if args.method.startswith("DDIM"):
        kwargs = {"sampler": "ddim", "num_steps": args.num_steps or 100, "eta": args.eta}
    elif args.method.startswith("DDPM"):
        kwargs = {"sampler": "ddpm"}
    elif args.method == "FlowMatching":
        kwargs = {"num_steps": args.num_steps or 100, "solver": args.solver or config.sampling.solver}
    else:
        kwargs = {"num_steps": args.num_steps or config.sampling.num_steps}
    if kwargs.get("sampler") == "ddim" and kwargs["num_steps"] > method.num_timesteps:
        print(f"error: --num_steps {kwargs['num_steps']} exceeds the checkpoint's {method.num_timesteps} "
              f"timesteps (DDIM takes a subset of them)", file=sys.stderr)
        return 2

    generator = torch.Generator(device=device).manual_seed(args.seed)
    chunks = []
    start = time.perf_counter()
    with torch.no_grad():
        remaining = args.num_samples
        while remaining > 0:
            n = min(args.batch_size, remaining)
            chunks.append(method.sample(n, image_shape, generator=generator, **kwargs).float().clamp(-1, 1).cpu())
            remaining -= n
    samples = torch.cat(chunks)
    seconds = time.perf_counter() - start

    from fastflow.data import save_image, to_uint8_nhwc

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npz":
        np.savez_compressed(out, images=to_uint8_nhwc(samples))
    else:
        save_image(samples, out, nrow=max(1, int(math.sqrt(args.num_samples))))
    print(f"wrote {args.num_samples} samples ({args.method}, {kwargs}) to {out} in {seconds:.1f}s "
          f"({args.num_samples / seconds:.1f} img/s on {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
