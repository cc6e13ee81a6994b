"""Scale-out on the existing engines: ``torchrun`` process groups, DDP or FSDP2, rank-sharded data, count-weighted
metrics, and full (gathered) state dicts for checkpoints and the ``save_pretrained`` export.

A stage builds its model, then :func:`setup` (which reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and
starts a gloo group on CPU, nccl on CUDA when ``WORLD_SIZE > 1``) and :meth:`DistContext.wrap` it:

- the trainable model is placed under a root :class:`LossModule` whose ``forward(batch)`` runs the stage's loss
  function. Under FSDP2 the root's forward is where the root-level parameters (embeddings, final norm, LM head,
  score head) are all-gathered, so the fused log-prob op sees the full LM-head weight, never a shard;
- ``ddp``: ``DistributedDataParallel`` of that root (gradients averaged over ranks);
- ``fsdp2``: ``fully_shard`` on every decoder layer, then on the root, with a ``MixedPrecisionPolicy`` whose
  ``reduce_dtype`` is float32 (``param_dtype`` the autocast dtype on CUDA; plain float32 on CPU).

Forward-only work that needs the full weights many times, GRPO's ``generate``, runs through
:meth:`DistContext.run_unsharded`: under FSDP2 each unit is all-gathered once for the whole call, not per token.

Data: global micro-batch ``i`` holds ``batch_size · world`` examples in the stage's seeded order; rank ``r`` takes
the ``r``-th contiguous slice of ``batch_size`` (a DistributedSampler whose ``set_epoch`` is the stage's
``(seed, epoch)`` permutation). Hence ``N`` ranks of ``batch_size`` take exactly the steps of one process with
``N · batch_size``: each rank's loss is a mean over its examples and DDP/FSDP average gradients over ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..modeling.layers import backbone_of, decoder_layers
from .config import STRATEGIES
from .metrics import NullWriter


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of the current process group (or of torchrun's environment before it starts); True when alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


class LossModule(nn.Module):
    """The root module under DDP/FSDP2: ``forward(batch)`` returns ``loss_fn(model, batch)`` (the loss and whatever
    the stage reads next to it); ``forward(**model_kwargs)`` with no batch is the plain model forward (scoring,
    evaluation), so that under FSDP2 the root-level parameters are gathered for it too."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn  # a plain function, not a submodule

    def forward(self, batch: Any = None, *, run: Callable[[nn.Module], Any] | None = None, **model_kwargs):
        """``loss_fn(model, batch)``; ``run(model)`` when ``run`` is given (work such as ``generate`` that needs
        the root's parameters gathered); the plain model forward on ``model_kwargs`` otherwise."""
        if run is not None:
            return run(self.model)
        if batch is None:
            return self.model(**model_kwargs)
        return self.loss_fn(self.model, batch)


class ScoringView:
    """What ``score_pairs``/``evaluate_pairs`` call as a model (``model(input_ids, attention_mask)``, ``.train``,
    ``.eval``, ``.training``), routed through the wrapped root so FSDP2 gathers its parameters."""

    def __init__(self, engine: nn.Module, model: nn.Module):
        self.engine, self.model = engine, model

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        return self.engine(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@dataclasses.dataclass
class DistContext:
    """One process's place in the run: ``rank``/``world`` (1 without torchrun), ``strategy`` and the device."""

    rank: int
    world: int
    local_rank: int
    strategy: str
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model ----------------------------------------------------------------------------------------------------
    def wrap(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Any],
        *,
        compute_dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """The engine to call as ``engine(batch)``: ``model`` under a :class:`LossModule` root, wrapped by the
        strategy when distributed. ``model`` is modified in place under FSDP2 (its parameters become DTensor
        shards), so build the optimizer from ``model.parameters()`` after this call."""
        root = LossModule(model, loss_fn)
        if not self.distributed:
            return root
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(root, device_ids=device_ids)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if self.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        kwargs = {} if mp is None else {"mp_policy": mp}
        for layer in decoder_layers(backbone_of(model)):
            fully_shard(layer, **kwargs)
        fully_shard(root, **kwargs)
        return root

    def no_sync(self, engine: nn.Module, last_micro_batch: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation (exact: averaging is
        linear); FSDP2 and single-process runs need nothing."""
        if self.strategy == "ddp" and self.distributed and not last_micro_batch:
            return engine.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Global gradient norm (clipped in place) as a plain scalar tensor (DTensor norms are made full)."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        full = getattr(norm, "full_tensor", None)
        return full() if full is not None else norm

    def run_unsharded(self, engine: nn.Module, model: nn.Module, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(model)`` with the full weights, forward-only work such as a whole rollout's ``generate`` calls.

        FSDP2: every FSDP module is set not to reshard after forward, and ``fn`` runs inside the root's forward,
        so the root-level parameters are all-gathered once and each decoder layer once, at its first forward;
        they stay gathered for every later token and are resharded when ``fn`` returns (never once per token).
        DDP and single-process runs hold full weights already: ``fn(model)`` directly."""
        if not (self.distributed and self.strategy == "fsdp2"):
            return fn(model)
        from torch.distributed.fsdp import FSDPModule

        engine.set_reshard_after_forward(False)
        try:
            return engine(run=fn)
        finally:
            for module in engine.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
            engine.set_reshard_after_forward(True)  # the layers' setting from fully_shard ...
            engine.set_reshard_after_forward(False, recurse=False)  # ... and the root's (kept for backward)

    # -- data -----------------------------------------------------------------------------------------------------
    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous slice of a global micro-batch of ``world · batch_size`` indices."""
        if len(indices) % self.world:
            raise ValueError(f"a global micro-batch of {len(indices)} does not split over {self.world} ranks")
        per_rank = len(indices) // self.world
        return list(indices[self.rank * per_rank : (self.rank + 1) * per_rank])

    # -- metrics --------------------------------------------------------------------------------------------------
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().to(torch.float64)
        if self.distributed:
            values = values.to(self.device) if self.device.type == "cuda" else values
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()

    def all_gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` (the same shape on each) concatenated along dim 0 in rank order, on the CPU in
        ``values``' dtype; ``values`` itself in a single process."""
        if not self.distributed:
            return values
        local = values.detach().to(torch.float64).contiguous()
        local = local.to(self.device) if self.device.type == "cuda" else local.cpu()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts).cpu().to(values.dtype)

    def all_gather_values(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``values`` (of any length) concatenated in rank order, on the CPU in ``values``' dtype;
        ``values`` itself in a single process. A collective."""
        if not self.distributed:
            return values
        counts = [int(c) for c in self.all_gather_rows(torch.tensor([values.numel()]))]
        padded = values.detach().new_zeros(max(max(counts), 1))
        padded[: values.numel()] = values.detach()
        rows = self.all_gather_rows(padded[None])
        return torch.cat([row[:count] for row, count in zip(rows, counts, strict=True)])

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's list of picklable ``items`` concatenated in rank order (on every rank); a collective."""
        if not self.distributed:
            return list(items)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]

    def mean_std(self, values: torch.Tensor) -> tuple[float, float]:
        """Mean and population std over every rank's ``values`` from all-reduced ``(Σx, Σx², n)``."""
        flat = values.detach().double().flatten().cpu()
        total, squares, count = self.all_reduce_sum(
            torch.stack([flat.sum(), (flat * flat).sum(), torch.tensor(float(flat.numel()))])
        ).tolist()
        if count == 0:
            return float("nan"), float("nan")
        mean = total / count
        return mean, max(squares / count - mean * mean, 0.0) ** 0.5

    def min_max(self, values: torch.Tensor) -> tuple[float, float]:
        """Minimum and maximum over every rank's ``values``."""
        flat = values.detach().double().flatten().cpu()
        both = (
            torch.stack([-flat.min(), flat.max()]) if flat.numel() else torch.full((2,), -math.inf, dtype=torch.float64)
        )
        if self.distributed:
            both = both.to(self.device) if self.device.type == "cuda" else both
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
        low, high = both.cpu().tolist()
        return -low, high

    def weighted_mean(self, value: float, count: float) -> float:
        """``Σ_r value_r · count_r / Σ_r count_r``: a per-rank mean reduced by its example count."""
        total, n = self.all_reduce_sum(torch.tensor([value * count, float(count)])).tolist()
        return total / n if n else float("nan")

    def writer(self, make: Callable[[], Any]):
        """``make()`` on rank 0, a writer that drops everything elsewhere."""
        return make() if self.is_main else NullWriter()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- state -------------------------------------------------------------------------------------------------
    def full_state_dict(self, engine: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every parameter and buffer of ``engine`` unsharded on CPU, on rank 0 (None elsewhere); a collective."""
        if not self.distributed:
            return {k: v.detach() for k, v in engine.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(engine, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def optimizer_state(self, engine: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer's full state keyed by parameter name (the same whatever the strategy and number of
        ranks), on CPU, on rank 0 (None elsewhere); a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(engine, optimizer, options=options)
        return state if self.is_main else None

    def load_optimizer_state(self, engine: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load :meth:`optimizer_state`'s output (read by every rank) into this run's optimizer: each FSDP2 rank
        keeps its shard, DDP ranks all of it. ValueError when the trainable parameters differ."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        saved = [name for group in state["param_groups"] for name in group["params"]]
        root = getattr(engine, "module", engine)  # DDP's wrapped root; FSDP2 keeps the names
        names = {id(p): name for name, p in root.named_parameters()}
        current = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        if sorted(saved) != sorted(current):
            missing = sorted(set(saved) ^ set(current))[:3]
            raise ValueError(f"the checkpoint's optimizer trains other parameters than this run's (e.g. {missing})")
        shapes = {names[id(p)]: tuple(p.shape) for group in optimizer.param_groups for p in group["params"]}
        for name, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes.get(name):
                    shape = tuple(value.shape)
                    raise ValueError(f"its {key} of {name} has shape {shape}, the parameter {shapes.get(name)}")
        options = StateDictOptions(full_state_dict=self.distributed)
        set_optimizer_state_dict(engine, optimizer, state, options=options)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup(strategy: str, device: torch.device) -> DistContext:
    """The process's :class:`DistContext`; starts the process group (gloo on CPU, nccl on CUDA, torchrun's env://
    rendezvous) when ``WORLD_SIZE > 1`` and none is running. On CUDA each rank uses ``cuda:LOCAL_RANK``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank() if world > 1 else 0
    return DistContext(rank=rank, world=world, local_rank=local_rank, strategy=strategy, device=device)
