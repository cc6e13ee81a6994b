"""Tile configs and the first-call autotuner of the Triton kernels; the Hopper candidates compiled for sm_90."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import rel_err
from triton.runtime.errors import OutOfResources

import aam_fast
from aam_fast.ops import triton_backward, triton_forward, triton_tuning
from aam_fast.ops.triton_tuning import TileConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = TileConfig(block_n=16, block_v=32, block_d=16, num_warps=4, num_stages=1)
OTHER = TileConfig(block_n=32, block_v=64, block_d=32, num_warps=4, num_stages=1)


@pytest.fixture(autouse=True)
def fresh_tuning_cache(monkeypatch):
    monkeypatch.setattr(triton_tuning, "_TUNED_CONFIGS", {})
    monkeypatch.setattr(triton_tuning, "_FITTED_CONFIGS", {})


def test_tuner_times_each_candidate_once_keeps_the_fastest_and_resets():
    launched, resets = [], []
    cost = {SMALL: 2.0, OTHER: 1.0}
    big = TileConfig(256, 256, 64, 8, 4)

    def launch(config):
        if config == big:
            raise OutOfResources(300000, 232448, "shared memory")
        launched.append(config)
        return config

    def timer(fn):
        return cost[fn()]

    result = triton_tuning.tuned_launch(("k",), [SMALL, big, OTHER], launch, tune=True, reset=lambda: resets.append(1),
                                        timer=timer)  # fmt: skip
    assert result == OTHER and launched == [SMALL, OTHER, OTHER] and len(resets) == 1
    launched.clear()
    assert triton_tuning.tuned_launch(("k",), [SMALL, OTHER], launch, tune=True, timer=None) == OTHER
    assert launched == [OTHER], "a tuned key is not timed again"


def test_without_tuning_the_first_config_runs_shrunk_to_fit():
    tried = []

    def launch(config):
        tried.append(config)
        if config.num_stages > 2:
            raise OutOfResources(300000, 232448, "shared memory")
        return config

    first = TileConfig(128, 128, 32, 8, 4)
    assert triton_tuning.tuned_launch(("k",), [first, SMALL], launch, tune=False) == TileConfig(128, 128, 32, 8, 2)
    assert tried[0] == first and SMALL not in tried


def test_candidates_fit_small_token_counts_and_the_shared_memory():
    configs = triton_tuning.candidate_configs(torch.bfloat16, backward=True, shared_memory=232448, n_rows=20)
    assert configs and all(c.block_n == 32 for c in configs)
    tight = triton_tuning.candidate_configs(torch.float32, backward=False, shared_memory=30000)
    assert all(c.num_stages * (c.block_n + c.block_v) * c.block_d * 4 <= 30000 for c in tight)
    assert any(c.num_stages == 2 for c in tight), "the pipeline depth shrank to fit"


def test_autotuned_kernels_give_the_untuned_results(monkeypatch):
    """Tuning runs the kernels several times: the backward's atomics must not keep what the timed runs added."""
    torch.manual_seed(0)
    hidden = torch.randn(45, 40) * 0.5
    weight = torch.randn(301, 40)
    bias = torch.randn(301)
    targets = torch.randint(0, 301, (45,))
    upstream = torch.randn(45)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        logp = aam_fast.linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], backend="triton")
        (logp * upstream).sum().backward()
        return [logp.detach()] + [leaf.grad for leaf in leaves]

    plain = run()
    timed = []

    def cpu_timer(fn):
        start = time.perf_counter()
        fn()
        timed.append(1)
        return time.perf_counter() - start

    for module in (triton_forward, triton_backward):
        monkeypatch.setattr(module, "choose_tile_configs", lambda *a, **k: [SMALL, OTHER])
        monkeypatch.setattr(module, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(triton_tuning, "median_ms", cpu_timer)
    tuned = run()
    assert len(timed) == 4, "two candidates for each of the two kernels"
    for got, want in zip(tuned, plain, strict=True):  # other tiles sum in another order; a kept run would add 100%
        assert rel_err(got, want) < 1e-5


def _triton_tool_missing() -> bool:
    import triton

    return not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file()


@pytest.mark.skipif(_triton_tool_missing(), reason="this triton wheel carries no cuobjdump to read sm_90 cubins")
def test_the_sm90_check_compiles_the_specialised_variant():
    """The offline compile specialises as the JIT does: at the aligned main shape the default forward tile gets the
    cp.async pipeline and wgmma; with an odd D (strides not divisible by 16) it loses the pipeline."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch; from bench import sm90_resources as R; "
        "from aam_fast.ops.triton_tuning import candidate_configs; "
        "c = candidate_configs(torch.bfloat16, backward=False, shared_memory=R.H100_SHARED_MEMORY)[0]; "
        "a = R.forward_resources(c, torch.bfloat16, R.SHAPES['aligned']); "
        "o = R.forward_resources(c, torch.bfloat16, R.SHAPES['odd-d']); "
        "print(a.async_copy, a.wgmma, a.stack, o.async_copy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["True", "True", "0", "False"], result.stdout


@pytest.mark.slow  # about 70 s of CPU with an empty Triton cache: some 130 compiles for sm_90 with ptxas
@pytest.mark.skipif(_triton_tool_missing(), reason="this triton wheel carries no cuobjdump to read sm_90 cubins")
def test_every_candidate_compiles_for_sm90_without_spills():
    """Each candidate tile shape, compiled for Hopper offline as the JIT specialises it at the aligned and ragged
    shapes, in every flag combination, spills no register, fits an H100's shared memory and the programs per SM it
    declares (bfloat16 stands for both 16-bit types: float16 compiles to the same resources within a few registers;
    `python -m bench.sm90_resources` covers float16 and the odd-D shape too)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.sm90_resources", "--check", "--dtypes", "bf16,tf32,fp32", "--shapes",
         "aligned,ragged"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


_PINNED_RUN = """
import sys
import torch
from safetensors.torch import save_file
import aam_fast

device, out = sys.argv[1], sys.argv[2]
n, d, v, dtype = (21, 16, 67, torch.float32) if device == "cpu" else (2048, 1024, 50257, torch.bfloat16)
gen = torch.Generator(device=device).manual_seed(5)
hidden = (torch.randn(n, d, generator=gen, device=device) * 2 / d**0.5).to(dtype).requires_grad_(True)
weight = torch.randn(v, d, generator=gen, device=device).to(dtype).requires_grad_(True)
targets = torch.randint(0, v, (n,), generator=gen, device=device)
upstream = torch.randn(n, generator=gen, device=device)
logp = aam_fast.linear_logprobs(hidden, weight, targets, backend="triton")
d_hidden, d_weight = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
loss, _, _ = aam_fast.linear_local_loss(hidden, weight, targets, lambda lp, _: (lp * upstream).sum(), backend="triton")
local_hidden, local_weight = torch.autograd.grad(loss, (hidden, weight))
tensors = dict(logp=logp, d_hidden=d_hidden, d_weight=d_weight, local_hidden=local_hidden, local_weight=local_weight)
save_file({k: t.detach().float().cpu().contiguous() for k, t in tensors.items()}, out)
"""


def test_pinned_autotuning_gives_the_same_bits_in_two_processes(tmp_path):
    """With AAM_FAST_AUTOTUNE=0 every process launches the default tiles: two processes give bit-identical log-probs
    and gradients (backward and local-loss mode). Under the interpreter on CPU, at a real shape in bfloat16 on a
    GPU (where the autotuner would otherwise pick per process)."""
    from safetensors.torch import load_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, triton_tuning.AUTOTUNE_ENV: "0", "PYTHONPATH": path}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    outs = [tmp_path / f"run{i}.safetensors" for i in range(2)]
    runs = [
        subprocess.Popen([sys.executable, "-c", _PINNED_RUN, device, str(out)], env=env, stderr=subprocess.PIPE)
        for out in outs
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err.decode()[-3000:]
    first, second = (load_file(str(out)) for out in outs)
    assert set(first) == {"logp", "d_hidden", "d_weight", "local_hidden", "local_weight"}
    for name in first:
        assert torch.equal(first[name], second[name]), name
