"""What the end-to-end harnesses share: the run settings every case takes, running a case in its own process, and
its peak memory."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

RUN_SETTINGS = ("seed", "threads", "device", "dtype")  # passed on to every case's process


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--seed``, ``--threads``, ``--device``, ``--dtype``: where and how every case runs."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="autocast dtype in both")


def run_case(case: str, command: list[str], args: argparse.Namespace) -> dict:
    """Run ``command`` (a harness's ``--case`` mode) with the run settings of ``args``; its result is the last line
    it prints (JSON), or ``{"case", "error"}`` with the end of its stderr. Echoed to stderr as it lands."""
    for name in RUN_SETTINGS:
        command = [*command, f"--{name}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        result = {"case": case, "error": done.stderr.strip().splitlines()[-3:]}
    else:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr)
    return result


def peak_memory() -> dict[str, float]:
    """The process's peak RSS and, where CUDA was used, the peak of memory allocated on the device (GiB)."""
    import torch

    peak = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        peak["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return peak
