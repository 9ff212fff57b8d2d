"""Issue 25's warm-up: what the first packed training call of the Mamba-2 scan and conv costs, and where.

Runs matvlm's own entry points (hybrid.ssd.ssd_chunk_scan, the mixer's causal conv) at the TinyLLaVA-3.2B
mixer's shape (32 heads of 80, d_state 80, 32 groups, chunk 128; `--heads`, `--headdim` for others, with
d_state = headdim and one group per head as convert makes them) on packed rows (4 x 8192, records of
100-3000 tokens), forward and backward, in bf16. The first call autotunes every Triton kernel it meets;
the second is the steady cost. Then every mamba_ssm SSD and fla conv autotuner reports how many configs
it tried, the best, and each config's time (Triton's `configs_timings`), so that a shortlist can be chosen.
Without `--full` the probe runs with kernels/autotune-sm90.json's shortlists, as matvlm does on Hopper.

    D=docs/results/distill/autotune
    python experiments/gpu/autotune_probe.py --full --output $D/probe-h200-hd80-full.json
    python experiments/gpu/autotune_probe.py --full --heads 32 --headdim 64 --output $D/probe-h200-hd64-full.json
    python experiments/gpu/autotune_probe.py --full --heads 16 --headdim 128 --output $D/probe-h200-hd128-full.json
    python experiments/gpu/autotune_probe.py --shortlist $D/*-full.json --output matvlm_cli/kernels/autotune-sm90.json
    python experiments/gpu/autotune_probe.py --output $D/probe-h200-hd80-shortlist.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHUNK, ROWS, LENGTH = 128, 4, 8192


def packed_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    seq_idx = torch.zeros(ROWS, LENGTH, dtype=torch.int32)
    cu = [0]
    for row in range(ROWS):
        at, i = 0, 0
        while at < LENGTH:
            n = min(rng.randint(100, 3000), LENGTH - at)
            seq_idx[row, at : at + n] = i
            at, i = at + n, i + 1
            cu.append(row * LENGTH + at)
    return seq_idx.cuda(), torch.tensor(cu, dtype=torch.int32, device="cuda")


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def autotuners() -> list[dict]:
    """Every Triton autotuner in mamba_ssm's SSD modules and fla's conv, with what it measured."""
    from matvlm_cli.kernels.shortlists import autotuners_in

    found = []
    for name, module in list(sys.modules.items()):
        if not (name.startswith("mamba_ssm.ops.triton.ssd") or name.startswith("fla.modules.causal_conv1d")):
            continue
        for attr, obj in autotuners_in(module):
            timings = getattr(obj, "configs_timings", None) or {}
            ranked = sorted(((str(c), t[0] if isinstance(t, list) else t) for c, t in timings.items()), key=lambda r: r[1])
            found.append({"module": name, "kernel": attr, "configs": len(obj.configs), "keys": [str(k) for k in obj.cache],
                          "best": str(obj.best_config) if getattr(obj, "best_config", None) else None,
                          "ranked_ms": ranked})
    return found


def write_shortlists(probes: list[Path], top: int, output: Path) -> None:
    """matvlm_cli/kernels/autotune-sm90.json: per kernel, the configs that ranked in the `top` at any probe
    (probes run with --full on a Hopper GPU)."""
    kernels, shapes = {}, []
    for path in probes:
        probe = json.loads(path.read_text())
        assert probe["autotune"] == "full", f"{path}: a probe of the shortlisted configs, not of them all"
        shapes.append(probe["shape"] | {"device": probe["device"], "date": probe["date"], "triton": probe["triton"]})
        for tuner in probe["autotuners"]:
            best = [config for config, ms in tuner["ranked_ms"][:top] if ms != float("inf")]
            kernels.setdefault(tuner["kernel"], [])
            kernels[tuner["kernel"]] += [c for c in best if c not in kernels[tuner["kernel"]]]
    kernels = {kernel: configs for kernel, configs in sorted(kernels.items()) if configs}
    output.write_text(json.dumps({"written_by": "experiments/gpu/autotune_probe.py --shortlist", "top": top, "shapes": shapes,
                                  "kernels": kernels}, indent=1) + "\n")
    print(f"{output}: {sum(map(len, kernels.values()))} configs for {len(kernels)} kernels")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--shortlist", nargs="*", type=Path, help="write --output as the shortlists of these probes' results")
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--headdim", type=int, default=80)
    parser.add_argument("--full", action="store_true", help="autotune over every config, as the kernels ship (no shortlist)")
    args = parser.parse_args()
    if args.shortlist:
        write_shortlists(args.shortlist, args.top, Path(args.output))
        return
    HEADS = GROUPS = args.heads
    HEADDIM = D_STATE = args.headdim
    if args.full:
        os.environ["MATVLM_AUTOTUNE"] = "full"
    from matvlm_cli import kernels
    from matvlm_cli.hybrid.ssd import causal_conv1d, ssd_chunk_scan

    seq_idx, cu = packed_rows()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, LENGTH, HEADS, HEADDIM, device="cuda", generator=g).bfloat16().requires_grad_()
    dt = F.softplus(torch.randn(ROWS, LENGTH, HEADS, device="cuda", generator=g) - 2).requires_grad_()
    A = -torch.rand(HEADS, device="cuda", generator=g) * 4 - 0.5
    B = (torch.randn(ROWS, LENGTH, GROUPS, D_STATE, device="cuda", generator=g) / D_STATE**0.5).bfloat16().requires_grad_()
    C = (torch.randn(ROWS, LENGTH, GROUPS, D_STATE, device="cuda", generator=g) / D_STATE**0.5).bfloat16().requires_grad_()
    D = torch.randn(HEADS, device="cuda", generator=g)
    channels = HEADS * HEADDIM + 2 * GROUPS * D_STATE
    xc = torch.randn(ROWS, LENGTH, channels, device="cuda", generator=g).bfloat16().transpose(1, 2).requires_grad_()
    weight = torch.randn(channels, 4, device="cuda", generator=g).bfloat16()
    bias = torch.randn(channels, device="cuda", generator=g).bfloat16()

    def scan():
        y, _ = ssd_chunk_scan(x, dt, A, B, C, CHUNK, D=D, seq_idx=seq_idx)
        y.float().square().mean().backward()

    def conv():
        causal_conv1d(xc, weight, bias, seq_idx, cu).float().square().mean().backward()

    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "shape": {"rows": ROWS, "length": LENGTH, "heads": HEADS, "headdim": HEADDIM,
              "d_state": D_STATE, "groups": GROUPS, "chunk": CHUNK, "conv_channels": channels}, "autotune": os.environ.get("MATVLM_AUTOTUNE", "shortlist"),
              "kernels": kernels.resolved(),
              "scan_backend": getattr(kernels.kernel("chunk_scan", x, needs_grad=True, packed=True), "__module__", "torch"),
              "conv_backend": getattr(kernels.kernel("conv1d", xc, packed=True), "__module__", "torch")}
    for name, fn in (("scan", scan), ("conv", conv)):
        result[f"{name}_first_s"] = round(timed(fn), 2)
        result[f"{name}_second_s"] = round(timed(fn), 4)
        print(name, result[f"{name}_first_s"], result[f"{name}_second_s"], flush=True)
    result["autotuners"] = autotuners()
    result["autotuned_configs"] = sum(len(a["ranked_ms"]) for a in result["autotuners"])
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "autotuners"}, indent=1))
    for a in result["autotuners"]:
        if a["ranked_ms"]:
            print(f"{a['kernel']:45s} {len(a['ranked_ms']):3d} configs  best {a['ranked_ms'][0][1]:.3f} ms  worst {a['ranked_ms'][-1][1]:.3f} ms")


if __name__ == "__main__":
    main()
