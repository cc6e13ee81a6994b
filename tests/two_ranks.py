"""Several steps in one torchrun launch, so that each rank imports torch, transformers and aam_fast once rather than
once per command (tests/test_distributed.py; a launch costs each rank seconds of imports, the tiny runs far less):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/two_ranks.py PLAN.json

PLAN.json is a list of steps that every rank runs in order:

- ``["cli", ARG, ...]``: ``aam_fast.cli.main([ARG, ...])``, which must return 0 (``python -m aam_fast ARG ...``);
- ``["copy", SOURCE, DESTINATION]`` / ``["remove", PATH]``: a folder copied or removed by rank 0 while rank 1 waits;
- ``["gathers", SETTINGS_JSON, OUT]``: build a GRPO trainer from the settings, make one rollout and write to OUT
  (rank 0) how many FSDP2 all-gathers it ran, the policy's decoder layers and the rollout's token width.

Before each step both ranks meet and rank 0 writes ``--- step K ---`` on stderr, so a test cuts the launch's stderr
into each step's lines. The process group starts here once and lives through every command: a command's own close
keeps it (a group destroyed and started again on torchrun's store would reuse the store's keys), and it is
destroyed when the plan ends.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

MARKER = "--- step {} ---"


def count_gathers(settings: dict, out: Path) -> None:
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as group_module

    from aam_fast.stages.grpo import GRPOConfig, GRPOTrainer

    gathers, original = [], group_module.foreach_all_gather

    def counting(*args, **kwargs):
        gathers.append(1)
        return original(*args, **kwargs)

    group_module.foreach_all_gather = counting
    try:
        trainer = GRPOTrainer(GRPOConfig(**settings))
        batches, _ = trainer.make_rollout()
    finally:
        group_module.foreach_all_gather = original
    if trainer.ctx.is_main:
        layers = len(trainer.policy.base_model.layers)
        out.write_text(json.dumps({"gathers": len(gathers), "layers": layers, "tokens": batches[0].targets.shape[1]}))
    trainer.ctx.close()


def run_step(step: list[str]) -> None:
    from aam_fast import cli

    kind, *args = step
    if kind == "cli":
        code = cli.main(args)
        if code != 0:
            raise SystemExit(f"aam-fast {' '.join(args)} exited {code}")
    elif kind in ("copy", "remove"):
        if dist.get_rank() == 0:
            shutil.copytree(*args) if kind == "copy" else shutil.rmtree(args[0])
        dist.barrier()
    elif kind == "gathers":
        count_gathers(json.loads(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown step {kind!r}")


def main(plan: Path) -> None:
    steps = json.loads(plan.read_text())
    dist.init_process_group("gloo")
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: None  # the commands' close keeps the group
    try:
        for number, step in enumerate(steps):
            dist.barrier()
            if dist.get_rank() == 0:
                print(MARKER.format(number), file=sys.stderr, flush=True)
            dist.barrier()
            run_step(step)
        dist.barrier()
    finally:
        dist.destroy_process_group = destroy
    destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
