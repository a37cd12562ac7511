#!/usr/bin/env python
"""Train DDPM / DDPM-x0 / Flow Matching / Flow Map Matching.

    python train.py --config configs/fmm.yaml [--overfit] [--resume PATH|auto] [--print-config] [key.sub=value ...]
    torchrun --nproc_per_node=8 train.py --config configs/fmm.yaml
"""

import argparse
import sys

from fastflow.config import ConfigError, config_to_dict, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (configs/*.yaml)")
    parser.add_argument("--overfit", action="store_true", help="train on one fixed batch (debugging)")
    parser.add_argument("--resume", default=None, help="checkpoint file, run folder, or 'auto' (latest of logging.run_name)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, type-checked against the schema")
    # intermixed: overrides may come before and after flags (… key=v --print-config key2=w)
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    from fastflow.train import train_from_config
    from fastflow.train.checkpoint import CheckpointError

    try:
        summary = train_from_config(config, resume=args.resume, overfit=args.overfit)
    except CheckpointError as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # found once the job started (e.g. torchrun restarts without a run name)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        # stopped by a signal after checkpointing: 128 + signal, as a shell reports it (130 for
        # Ctrl-C, 143 for SIGTERM), so that a scheduler does not take the job for finished
        return 128 + int(summary["signal"] or 15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
