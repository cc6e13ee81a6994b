"""Before any timing: every provider's token log-probs and gradients against float32, at one or more shapes.

    python -m bench.check_providers --out correctness.json      # on CUDA: N=16384 (several chunks) and ragged shapes
    python -m bench.check_providers --shapes 300,64,1000 --dtype float32 --device cpu   # any machine

The inputs are the benchmarks' own (`bench.inputs.make_inputs`). The reference materialises float32 logits from the
same (rounded) inputs and differentiates them with autograd; naive in the inputs' dtype is the baseline. A provider
passes when each of its relative errors (‖x − ref‖ / ‖ref‖ for the log-probs, d_hidden and d_weight of
`Σ g·logp`) is at most `max(2 × naive's, naive's + 2e-3)`, with 1e-2 more for the gradient-filtered ones (cce and
aam-*-filter drop gradient entries below 2⁻¹²). Every figure is printed and the JSON (`--out`) is rewritten after
each provider, so a time-out loses only the running one; a provider that is not installed is recorded with the
reason. The exit status is 1 if a provider that ran failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

from .inputs import make_inputs
from .providers import Unavailable, all_providers
from .shapes import token_shape

FILTERED = ("cce", "aam-torch-filter", "aam-triton-filter")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (inf if `actual` has a non-finite entry)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


# On CUDA: the aam_fast Triton modes and the peers the benchmarks time (naive, the baseline, always runs).
GPU_PROVIDERS = ("aam-triton", "aam-triton-local", "aam-triton-filter", "liger", "cce", "torch-lce")
GPU_SHAPES = "16384,4096,128256;8191,4096,128257"


def logprobs_and_grads(fn, hidden, weight, targets, grad_out):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp = fn(h, w, targets)
    d_h, d_w = torch.autograd.grad((logp.float() * grad_out).sum(), [h, w])
    return logp.detach().float(), d_h, d_w


def provider_grads(provider, hidden, weight, targets, grad_out):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, d_h, d_w = provider.logprobs_and_grads(h, w, targets, grad_out)
    return logp.detach().float(), d_h, d_w


def float32_reference(hidden, weight, targets):
    h, w = hidden.float(), weight.float()
    return torch.log_softmax(h @ w.t(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def naive(hidden, weight, targets):
    return torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def errors_of(result, reference) -> dict[str, float]:
    return {name: rel_err(a, b) for name, a, b in zip(("logp", "d_hidden", "d_weight"), result, reference, strict=True)}


def check(shape, device: torch.device, names: list[str] | None = None, on_entry=None) -> dict:
    """The report of one shape; `on_entry(report)` is called after each provider (to write it out)."""
    inputs = make_inputs(shape, device)
    hidden, weight, targets, grad_out = inputs.hidden, inputs.weight, inputs.targets, inputs.grad_out
    reference = logprobs_and_grads(float32_reference, hidden, weight, targets, grad_out)
    baseline = errors_of(logprobs_and_grads(naive, hidden, weight, targets, grad_out), reference)
    report = {
        "shape": shape.id,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "reference": "float32 materialised logits, autograd",
        "naive": baseline,
        "providers": {},
    }
    print(json.dumps({shape.id: {"naive": baseline}}), flush=True)
    for name, provider in all_providers().items():
        if names and name not in names:
            continue
        try:
            provider.check("logprobs-fwdbwd", device)
            result = provider_grads(provider, hidden, weight, targets, grad_out)
        except Unavailable as exc:
            entry = {"skipped": str(exc)}
        except Exception as exc:  # a peer that fails here (out of memory, say) is reported, not fatal
            entry = {"error": f"{type(exc).__name__}: {exc}"[:500], "ok": False}
        else:
            entry = errors_of(result, reference)
            slack = 1e-2 if name in FILTERED else 0.0
            tolerance = {k: max(2 * b, b + 2e-3) + slack for k, b in baseline.items()}
            entry["tolerance"] = tolerance
            entry["ok"] = all(entry[k] <= tolerance[k] for k in tolerance)
            del result
        report["providers"][name] = entry
        print(json.dumps({shape.id: {name: entry}}), flush=True)
        if on_entry is not None:
            on_entry(report)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """ "N,D,V;N,D,V" -> [(N, D, V), ...] (ValueError naming the entry that is not three integers)."""
    shapes = []
    for entry in filter(None, text.split(";")):
        parts = entry.split(",")
        if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(f"--shapes entries must be N,D,V (positive integers), got {entry!r}")
        shapes.append(tuple(int(part) for part in parts))
    if not shapes:
        raise ValueError("--shapes names no shape")
    return shapes


def write_json(path: str | None, payload) -> None:
    """Write `payload` to `path` through a temporary file (a reader never sees half a file)."""
    if path:
        with open(path + ".tmp", "w") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", "--shape", default=None, help=f"N,D,V[;N,D,V...] (default on CUDA: {GPU_SHAPES})")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--providers",
        default=None,
        help=f"comma-separated names (default on CUDA: {','.join(GPU_PROVIDERS)}; else all)",
    )
    parser.add_argument("--out", default=None, help="write the report here as JSON (rewritten after each provider)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    try:
        shapes = parse_shapes(args.shapes or (GPU_SHAPES if device.type == "cuda" else "300,64,1000"))
    except ValueError as exc:
        parser.error(str(exc))
    if args.providers is None:
        names = list(GPU_PROVIDERS) if device.type == "cuda" else []
    else:
        names = [x for x in args.providers.split(",") if x]
    reports: list[dict] = []

    def on_entry(report):
        write_json(args.out, {"shapes": reports + [report]})

    for n, d, v in shapes:
        reports.append(check(token_shape(n, d, v, args.dtype), device, names, on_entry))
        write_json(args.out, {"shapes": reports})
        gc.collect()
    failed = [f"{r['shape']}: {name}" for r in reports for name, e in r["providers"].items() if e.get("ok") is False]
    if failed:
        print("providers off the float32 reference: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
