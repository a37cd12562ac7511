"""Error of the finite-difference ∂_t v_θ against a float64 forward-mode reference, vs h and dtype.

    python bench/fd_error_table.py            # default UNet (Config(): 128ch, [1,2,2,4], 64×64, ~65M)
    python bench/fd_error_table.py --small    # 32ch, [1,2], 16×16: seconds instead of tens of minutes

For each weight set (fresh init; "trained-like": every ResBlock's FiLM projection ``time_proj``
scaled ×``--film-gain`` so the time conditioning modulates activations by O(1), as in a trained
ADM-style UNet, where at init it is ~10%) it computes

- the reference ∂_t v in float64: the explicit forward-mode (``dual``) pass of ``model.double()``;
  s and t are multiples of 1/1024, so t·num_timesteps is exact in float32 and float64 alike and
  both models see the same times;
- for each h: ``finite_difference_derivative(model, x, s, t, h, precision="autocast")`` in float32,
  and in bf16 under ``torch.autocast`` (device type of the run); the relative error ‖∂_t v_fd − ∂_t v_ref‖/‖∂_t v_ref‖
  (Frobenius over the batch) and the same for v = (v₊ + v₋)/2;
- the floor: the ``dual`` backend in the same dtype against the same reference.

Next to the measurements it prints the error model of docs/derivative.md (see :func:`predicted`).
On a CPU without native bf16 GEMMs the bf16 runs emulate autocast's GEMMs (:class:`Bf16GemmEmulation`,
``--bf16 native`` to use the real ones).

Prints a markdown table (and writes it to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastflow.config import Config  # noqa: E402
from fastflow.methods import build_network  # noqa: E402
from fastflow.methods.time_derivative import dual_derivative, finite_difference_derivative  # noqa: E402

STEPS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 5e-5, 3e-5, 1e-5, 1e-6)
EPS = {"float32": 2.0**-24, "bf16": 2.0**-8}


class Bf16GemmEmulation(TorchFunctionMode):
    """bf16 autocast's GEMMs (conv, linear, matmul) as float32 GEMMs on bf16-rounded operands, output
    rounded to bf16: the numerics of a bf16 GEMM with float32 accumulation (products of two bf16
    values are exact in float32), up to summation order. Everything else runs under the real
    autocast. For CPUs without native bf16 GEMMs, where a bf16 3×3 convolution is ~150× slower
    than float32 (measured here) and the default-config table would take hours.
    """

    GEMMS = {F.conv2d, F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.GEMMS and torch.is_autocast_enabled("cpu"):
            def to_bf16_grid(a):
                return a.bfloat16().float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

            with torch.autocast("cpu", enabled=False):
                out = func(*tree_map(to_bf16_grid, args), **tree_map(to_bf16_grid, kwargs))
            return out.bfloat16()
        return func(*args, **kwargs)


def _precision_context(mode: str, device: torch.device, emulate_bf16: bool) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if mode == "bf16":
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if emulate_bf16:
            stack.enter_context(Bf16GemmEmulation())
    return stack


def _config(small: bool) -> Config:
    config = Config()
    config.model.dropout = 0.0
    if small:
        config.model.base_channels = 32
        config.model.channel_mult = [1, 2]
        config.model.attention_resolutions = [8]
        config.data.image_size = 16
    return config


def _dyadic_times(batch: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """s < t, both multiples of 1/1024 in [1/1024, 1 − 1/1024]: t·1000 is exact in float32."""
    t = torch.randint(200, 1000, (batch,), generator=generator)
    s = (t - torch.randint(1, 200, (batch,), generator=generator)).clamp(min=1)
    return s.double() / 1024, t.double() / 1024


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _make_trained_like(model: torch.nn.Module, film_gain: float) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("time_proj"):
                module.weight.mul_(film_gain)
                module.bias.mul_(film_gain)


@torch.no_grad()
def measure(model: torch.nn.Module, x, s, t, device: torch.device, steps=STEPS, emulate_bf16: bool = False) -> Dict[str, object]:
    model = model.to(device).eval()
    ref_model = copy.deepcopy(model).double()
    x64, s64, t64 = x.double().to(device), s.to(device), t.to(device)
    start = time.perf_counter()
    v_ref, dv_ref = dual_derivative(ref_model, x64, s64, t64)
    ref_seconds = time.perf_counter() - start
    del ref_model
    x32, s32, t32 = x64.float(), s64.float(), t64.float()
    rows: Dict[str, Dict[str, Tuple[float, float]]] = {}
    floors: Dict[str, Tuple[float, float]] = {}
    for mode in ("float32", "bf16"):
        with _precision_context(mode, device, emulate_bf16):
            v, dv = dual_derivative(model, x32, s32, t32)
        floors[mode] = (_rel(v, v_ref), _rel(dv, dv_ref))
        rows[mode] = {}
        for h in steps:
            with _precision_context(mode, device, emulate_bf16):
                v, dv = finite_difference_derivative(model, x32, s32, t32, h, precision="autocast")
            rows[mode][h] = (_rel(v, v_ref), _rel(dv, dv_ref))
            print(f"  {mode:8s} h={h:.0e}  ∂_t v rel err {rows[mode][h][1]:.3e}   v rel err {rows[mode][h][0]:.3e}", flush=True)
    ratio = (v_ref.norm() / dv_ref.norm()).item()
    return {"rows": rows, "floors": floors, "v_over_dv": ratio, "ref_seconds": ref_seconds, "t_max": t.max().item()}


def predicted(h: float, v_over_dv: float, v_rounding: float, t_max: float, omega: float) -> float:
    """The error model of docs/derivative.md, three terms:

    truncation 1 − sin(ω·h)/(ω·h) ≈ (ω·h)²/6 of the top embedding frequency ω = num_timesteps;
    time rounding ε₃₂·t/h (t ± h and t·num_timesteps are float32 in every precision);
    forward rounding δ_v·‖v‖/(‖∂_t v‖·h), δ_v = the forward's own relative error (the floor's v).
    """
    wh = omega * h
    truncation = 1.0 - math.sin(wh) / wh
    return truncation + EPS["float32"] * t_max / h + v_rounding * v_over_dv / h


def to_markdown(results: Dict[str, Dict[str, object]], header: str, omega: float) -> str:
    lines = [header, ""]
    for label, res in results.items():
        rows, floors, ratio, t_max = res["rows"], res["floors"], res["v_over_dv"], res["t_max"]
        lines += [
            f"### {label}  (‖v‖/‖∂_t v‖ = {ratio:.3g})",
            "",
            "| h | ∂_t v float32 | ∂_t v bf16 | v float32 | v bf16 | model float32 | model bf16 |",
            "|---|---|---|---|---|---|---|",
        ]
        for h in STEPS:
            f32, bf = rows["float32"][h], rows["bf16"][h]
            lines.append(
                f"| {h:.0e} | {f32[1]:.2e} | {bf[1]:.2e} | {f32[0]:.2e} | {bf[0]:.2e} "
                f"| {predicted(h, ratio, floors['float32'][0], t_max, omega):.1e} "
                f"| {predicted(h, ratio, floors['bf16'][0], t_max, omega):.1e} |"
            )
        lines.append(
            f"| dual (floor) | {floors['float32'][1]:.2e} | {floors['bf16'][1]:.2e} "
            f"| {floors['float32'][0]:.2e} | {floors['bf16'][0]:.2e} | | |"
        )
        best = {m: min(STEPS, key=lambda h: rows[m][h][1]) for m in ("float32", "bf16")}
        lines += ["", f"Best h: float32 {best['float32']:.0e} ({rows['float32'][best['float32']][1]:.2e}), "
                  f"bf16 {best['bf16']:.0e} ({rows['bf16'][best['bf16']][1]:.2e}).", ""]
    return "\n".join(lines)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="32 channels, [1,2], 16×16 (quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--film-gain", type=float, default=5.0, help="time_proj gain of the trained-like weights")
    parser.add_argument("--skip-trained-like", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--bf16", choices=("auto", "native", "emulated"), default="auto",
                        help="bf16 GEMMs: native autocast, or emulated (Bf16GemmEmulation); auto: emulated on CPU")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    emulate = args.bf16 == "emulated" or (args.bf16 == "auto" and device.type == "cpu")
    config = _config(args.small)
    torch.manual_seed(args.seed)
    model = build_network(config)
    generator = torch.Generator().manual_seed(args.seed + 1)
    size, channels = config.data.image_size, config.data.channels
    x = torch.randn(args.batch, channels, size, size, generator=generator)
    s, t = _dyadic_times(args.batch, generator)
    omega = float(config.flow_map_matching.num_timesteps)
    params = sum(p.numel() for p in model.parameters())
    m = config.model
    desc = (f"base {m.base_channels}, mult {m.channel_mult}, attention {m.attention_resolutions}, "
            f"{size}×{size}, {params / 1e6:.1f}M params, batch {args.batch}, seed {args.seed}")
    print(f"fd_error_table: {desc}; t = {t.tolist()}, s = {s.tolist()}", flush=True)

    results: Dict[str, Dict[str, object]] = {}
    weight_sets = [("fresh init", model)]
    if not args.skip_trained_like:
        trained = copy.deepcopy(model)
        _make_trained_like(trained, args.film_gain)
        weight_sets.append((f"trained-like (time_proj ×{args.film_gain:g})", trained))
    for label, net in weight_sets:
        print(f"{label}:", flush=True)
        results[label] = measure(net, x, s, t, device, emulate_bf16=emulate)

    header = "\n".join([
        f"## Finite-difference ∂_t v error vs h ({'small' if args.small else 'default'} UNet)",
        "",
        f"{desc}; device {device.type} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. Relative Frobenius error against the float64 `dual` pass. "
        f"bf16 = `torch.autocast({device.type!r}, bfloat16)`"
        f"{' with its GEMMs emulated (float32 GEMMs on bf16-rounded operands, bf16 output)' if emulate else ''}. `model` columns: "
        f"1 − sin(ω·h)/(ω·h) + ε₃₂·max t/h + δ_v·‖v‖/(‖∂_t v‖·h), ω = {omega:g}, δ_v = the floor row's v error.",
    ])
    text = to_markdown(results, header, omega)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
