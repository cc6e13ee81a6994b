"""Before any timing: every provider's token log-probs and gradients at the main GPU shape against float32.

    python -m bench.check_providers --out errors.json            # N=8192, D=4096, V=128256, bfloat16, on CUDA
    python -m bench.check_providers --shape 300,64,1000 --dtype float32 --device cpu   # any machine

The inputs are the benchmarks' own (`bench.inputs.make_inputs`). The reference materialises float32 logits from the
same (rounded) inputs and differentiates them with autograd; naive in the inputs' dtype is the baseline. A provider
passes when each of its relative errors (‖x − ref‖ / ‖ref‖ for the log-probs, d_hidden and d_weight of
`Σ g·logp`) is at most `max(2 × naive's, naive's + 2e-3)`, with 1e-2 more for the gradient-filtered ones (cce and
aam-*-filter drop gradient entries below 2⁻¹²). Every figure is printed and written to `--out` as JSON; the exit
status is 1 if a provider that ran failed.
"""

from __future__ import annotations

import argparse
import gc
import json
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


def logprobs_and_grads(fn, hidden, weight, targets, grad_out):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp = fn(h, w, targets)
    d_h, d_w = torch.autograd.grad((logp.float() * grad_out).sum(), [h, w])
    return logp.detach().float(), d_h, d_w


def float32_reference(hidden, weight, targets):
    h, w = hidden.float(), weight.float()
    return torch.log_softmax(h @ w.t(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def naive(hidden, weight, targets):
    return torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def errors_of(result, reference) -> dict[str, float]:
    return {name: rel_err(a, b) for name, a, b in zip(("logp", "d_hidden", "d_weight"), result, reference, strict=True)}


def check(shape, device: torch.device, names: list[str] | None = None) -> dict:
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
    print(json.dumps({"naive": baseline}), flush=True)
    for name, provider in all_providers().items():
        if names and name not in names:
            continue
        try:
            provider.check("logprobs-fwdbwd", device)
            result = logprobs_and_grads(provider.token_logprobs, hidden, weight, targets, grad_out)
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
        print(json.dumps({name: entry}), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8192,4096,128256", help="N,D,V")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", default="", help="comma-separated names (default: all)")
    parser.add_argument("--out", default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)
    try:
        n, d, v = (int(x) for x in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be N,D,V, got {args.shape!r}")
    names = [x for x in args.providers.split(",") if x]
    report = check(token_shape(n, d, v, args.dtype), torch.device(args.device), names)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1, sort_keys=True)
    failed = [name for name, entry in report["providers"].items() if entry.get("ok") is False]
    if failed:
        print("providers off the float32 reference: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
