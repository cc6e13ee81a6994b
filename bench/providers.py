"""aam_fast backends and the peers, behind one interface: token log-probs, the AAM pairwise loss, the GRPO loss.

Every provider computes float32 token log-probs `ℓ = z[y] − logsumexp(z)`, `z = h Wᵀ`, differentiable in `h` and
`W`. A peer with no loss of its own gets the two losses composed from its token log-probs in plain PyTorch
(`aam_loss_reference`, `grpo_loss_reference`), so every provider does the same matrix work. Liger has losses of its
own: its chunked DPO loss stands in for the trained-through pairwise loss (same pairwise-sigmoid-plus-NLL shape,
with the reference log-probs constant and the reward terms left out, a cost of O(B)), and for the detached margin
its DPO function runs forward-only to give the sequence log-probs the AAM formula then uses. Its GRPO loss is
configured like aam_fast's (token-mean, k3 KL, symmetric clip).

A provider that cannot run a workload on a device raises `Unavailable` with the reason; the benchmarks turn that
into a skip.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
WORKLOADS = ("logprobs-fwd", "logprobs-fwdbwd", "aam-detached", "aam-trained", "grpo")
TOKEN_WORKLOADS = ("logprobs-fwd", "logprobs-fwdbwd")


class Unavailable(Exception):
    """This provider cannot run this workload here; the message says why."""


@dataclass
class PairBatch:
    """A `[chosen; rejected]` batch of B pairs: rows 0..B-1 chosen, B..2B-1 rejected."""

    hidden: torch.Tensor  # [2B, T, D]
    weight: torch.Tensor  # [V, D]
    targets: torch.Tensor  # [2B, T]
    rewards: torch.Tensor  # [2B] reward-head outputs (require grad)
    ref_logps: torch.Tensor  # [2B] reference sequence log-probs, mean over tokens
    beta: float = 1.0
    sft_weight: float = 0.0


@dataclass
class GRPOBatch:
    """B sampled completions with their advantages and the old-policy and reference token log-probs."""

    hidden: torch.Tensor  # [B, T, D]
    weight: torch.Tensor  # [V, D]
    targets: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B]
    old_logps: torch.Tensor  # [B, T]
    ref_logps: torch.Tensor  # [B, T]
    epsilon: float = 0.2
    beta: float = 0.04


def sequence_mean(token_logps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token log-prob of each row over the positions whose target is not ignored."""
    mask = (targets != IGNORE_INDEX).to(token_logps.dtype)
    return (token_logps * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def aam_loss_reference(seq_logps: torch.Tensor, batch: PairBatch, detach_margin: bool) -> torch.Tensor:
    """`mean −log σ(r_c − r_r − m) + sft_weight · mean(−L(c))`, `m = β[(L(c) − L(r)) − (L_ref(c) − L_ref(r))]`."""
    pairs = batch.rewards.shape[0] // 2
    margin = batch.beta * (
        (seq_logps[:pairs] - seq_logps[pairs:]) - (batch.ref_logps[:pairs] - batch.ref_logps[pairs:])
    )
    if detach_margin:
        margin = margin.detach()
    rewards = batch.rewards.float()
    loss = -F.logsigmoid(rewards[:pairs] - rewards[pairs:] - margin).mean()
    if batch.sft_weight:
        loss = loss - batch.sft_weight * seq_logps[:pairs].mean()
    return loss


def grpo_loss_reference(token_logps: torch.Tensor, batch: GRPOBatch) -> torch.Tensor:
    """Token-mean `−min(ρA, clip(ρ, 1±ε)A) + β·k3`, `ρ = exp(ℓ − ℓ_old)`, `k3 = exp(ℓ_ref − ℓ) − (ℓ_ref − ℓ) − 1`."""
    ratio = torch.exp(token_logps - batch.old_logps)
    adv = batch.advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - batch.epsilon, 1.0 + batch.epsilon) * adv)
    to_ref = batch.ref_logps - token_logps
    per_token = -surrogate + batch.beta * (torch.exp(to_ref) - to_ref - 1.0)
    mask = (batch.targets != IGNORE_INDEX).float()
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _import(module: str, distribution: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{distribution} is not installed ({exc})") from exc


class Provider:
    """One way of computing the workloads. Subclasses override `token_logprobs` and, if they have them, losses."""

    name = ""
    distribution = "torch"
    # Compiled or autotuned on first use: the first call is a warm-up, never a timed round.
    needs_warmup = False

    def warmup_key(self, workload: str) -> str:
        """Workloads with the same key share compiled code: on CPU one warm-up per key and process suffices."""
        return f"{self.name}:{workload}"

    def check(self, workload: str, device: torch.device) -> None:
        """Raise `Unavailable` if this provider cannot run `workload` on `device`."""

    def version(self) -> str:
        return _version(self.distribution)

    def token_logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logprobs_and_grads(self, hidden, weight, targets, grad_out) -> tuple[torch.Tensor, ...]:
        """``(logp, d_hidden, d_weight)`` of ``Σ grad_out·logp`` for leaves ``hidden`` and ``weight`` (requiring grad):
        by default the token log-probs, then autograd with ``grad_out`` as the upstream gradient."""
        logp = self.token_logprobs(hidden, weight, targets)
        grads = torch.autograd.grad(logp, (hidden, weight), grad_out.view_as(logp))
        return (logp.detach(), *grads)

    def pairwise_loss(self, batch: PairBatch, detach_margin: bool) -> torch.Tensor:
        trained = not detach_margin or batch.sft_weight != 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and trained):
            token_logps = self.token_logprobs(batch.hidden, batch.weight, batch.targets)
        return aam_loss_reference(sequence_mean(token_logps, batch.targets), batch, detach_margin)

    def grpo_loss(self, batch: GRPOBatch) -> torch.Tensor:
        return grpo_loss_reference(self.token_logprobs(batch.hidden, batch.weight, batch.targets), batch)


class AamProvider(Provider):
    """aam_fast with an explicit backend: `linear_logprobs`, `aam_loss`, `grpo_loss`; with `grad_filter_eps` its
    gradient-filtered form (named `aam-<backend>-filter`), which runs only the workloads with a backward pass."""

    distribution = "aam-fast"
    FILTER_EPS = 2.0**-12  # Cut Cross-Entropy's default threshold for bfloat16

    def __init__(self, backend: str, grad_filter_eps: float | None = None):
        self.backend = backend
        self.grad_filter_eps = grad_filter_eps
        self.name = f"aam-{backend}" + ("-filter" if grad_filter_eps else "")
        # Triton compiles and autotunes on first use; under the interpreter (CPU) nothing is compiled
        self.needs_warmup = backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"

    def _module(self):
        return _import("aam_fast", "aam_fast")

    def check(self, workload, device):
        self._module()
        if self.grad_filter_eps and workload in ("logprobs-fwd", "aam-detached"):
            raise Unavailable("gradient filtering changes only the backward pass: this workload has none")
        if self.backend == "triton" and device.type != "cuda" and not interpreted_triton(device):
            raise Unavailable(
                "aam_fast's triton backend is benchmarked on CUDA only (TRITON_INTERPRET=1 runs it on CPU at tiny "
                "shapes, as the GPU check's rehearsal does)"
            )
        try:
            from aam_fast.ops.backends import resolve_backend
        except ImportError:  # an aam_fast without the registry: let the call itself say what is wrong
            return
        try:
            resolve_backend(self.backend, device)
        except ValueError as exc:
            raise Unavailable(f"aam_fast backend {self.backend!r} cannot run here: {exc}") from exc

    def version(self):
        return getattr(self._module(), "__version__", "unknown")

    def token_logprobs(self, hidden, weight, targets):
        return self._module().linear_logprobs(
            hidden, weight, targets, backend=self.backend, grad_filter_eps=self.grad_filter_eps
        )

    def pairwise_loss(self, batch, detach_margin):
        out = self._module().aam_loss(
            batch.hidden,
            batch.weight,
            batch.targets,
            batch.rewards,
            ref_logps=batch.ref_logps,
            margin="pr",
            beta=batch.beta,
            length_norm="mean",
            detach_margin=detach_margin,
            sft_weight=batch.sft_weight,
            backend=self.backend,
            grad_filter_eps=self.grad_filter_eps,
        )
        return out.loss

    def grpo_loss(self, batch):
        out = self._module().grpo_loss(
            batch.hidden,
            batch.weight,
            batch.targets,
            batch.advantages,
            old_logps=batch.old_logps,
            ref_logps=batch.ref_logps,
            epsilon=batch.epsilon,
            beta=batch.beta,
            kl="k3",
            loss_type="token-mean",
            compute_entropy=False,
            backend=self.backend,
            grad_filter_eps=self.grad_filter_eps,
        )
        return out.loss


class AamLocalProvider(AamProvider):
    """aam_fast's local-loss mode (three products: the logits stored once, dZ formed in place): the token log-probs
    and gradients of ``Σ grad_out·logp``, a local loss whose per-token gradient is known in the forward. Only the
    forward+backward token workload states its upstream gradient in advance; aam_fast's GRPO loss runs this mode
    already (``aam-<backend>`` on the grpo workload)."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.name = f"aam-{backend}-local"

    def check(self, workload, device):
        if workload != "logprobs-fwdbwd":
            raise Unavailable(
                "the local-loss mode needs the per-token gradient in the forward: only logprobs-fwdbwd states it "
                f"(aam-{self.backend}'s GRPO loss already runs this mode)"
            )
        super().check(workload, device)

    def logprobs_and_grads(self, hidden, weight, targets, grad_out):
        grad = grad_out.view(targets.shape)
        loss, logp, _ = self._module().linear_local_loss(
            hidden, weight, targets, lambda lp, _: (lp * grad).sum(), backend=self.backend
        )
        return (logp, *torch.autograd.grad(loss, (hidden, weight)))


def interpreted_triton(device: torch.device) -> bool:
    """Triton kernels on CPU tensors under the interpreter (TRITON_INTERPRET=1): the CPU rehearsal of the GPU
    check, at tiny shapes."""
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def naive_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Materialised logits (in the inputs' dtype, as an LM head makes them) → float32 log_softmax → gather."""
    logits = (hidden @ weight.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class NaiveProvider(Provider):
    name = "naive"

    def token_logprobs(self, hidden, weight, targets):
        return naive_token_logprobs(hidden, weight, targets)


def _grad_mode_key(name: str, workload: str) -> str:
    """Token log-probs with or without autograd: the two graphs a compiled token-log-prob function has."""
    no_grad = workload in ("logprobs-fwd", "aam-detached")
    return f"{name}:{'no-grad' if no_grad else 'grad'}"


class NaiveCompileProvider(Provider):
    """The naive function under `torch.compile` (default mode). On CPU it is compiled with dynamic shapes, once
    per process and graph, so that compiling (tens of seconds on 2 cores) happens in one warm-up, not per shape;
    on CUDA shapes specialise and every case is warmed up."""

    name = "naive-compile"
    needs_warmup = True
    _compiled: dict = {}

    def warmup_key(self, workload):
        return _grad_mode_key(self.name, workload)

    def token_logprobs(self, hidden, weight, targets):
        dynamic = None if hidden.is_cuda else True
        if dynamic not in self._compiled:
            self._compiled[dynamic] = torch.compile(naive_token_logprobs, dynamic=dynamic)
        return self._compiled[dynamic](hidden, weight, targets)


class LigerProvider(Provider):
    """Liger-Kernel: fused linear cross entropy (Triton), chunked DPO and GRPO losses (compiled PyTorch)."""

    name = "liger"
    distribution = "liger-kernel"
    needs_warmup = True

    def check(self, workload, device):
        _import("liger_kernel", self.distribution)
        if workload in TOKEN_WORKLOADS and device.type != "cuda":
            raise Unavailable("Liger's fused linear cross entropy is a Triton kernel: it needs CUDA")

    def token_logprobs(self, hidden, weight, targets):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
        loss = loss_fn(weight, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
        return -loss.float().view(targets.shape)

    def _dpo(self, batch: PairBatch):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        return LigerFusedLinearDPOLoss(
            ignore_index=IGNORE_INDEX,
            beta=batch.beta,
            alpha=batch.sft_weight,
            compute_nll_loss=batch.sft_weight != 0,
            use_ref_model=False,
            average_log_prob=True,
        )

    def pairwise_loss(self, batch, detach_margin):
        if detach_margin and batch.sft_weight == 0:
            with torch.no_grad():
                _, aux = self._dpo(batch)(batch.weight.detach(), batch.hidden.detach(), batch.targets)
            seq_logps = torch.cat([aux[0], aux[1]]).float()
            return aam_loss_reference(seq_logps, batch, detach_margin)
        if not detach_margin:
            loss, _ = self._dpo(batch)(batch.weight, batch.hidden, batch.targets)
            return loss
        raise Unavailable("Liger's DPO loss has no detached-margin form with an SFT term")

    def grpo_loss(self, batch):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(
            beta=batch.beta,
            use_ref_model=True,
            epsilon_low=batch.epsilon,
            epsilon_high=batch.epsilon,
            loss_type="dapo",
        )
        mask = (batch.targets != IGNORE_INDEX).to(torch.float32)
        loss, _ = loss_fn(
            batch.hidden,
            batch.weight,
            batch.targets,
            mask,
            batch.advantages,
            ref_per_token_logps=batch.ref_logps,
            old_per_token_logps=batch.old_logps,
        )
        return loss


class CceProvider(Provider):
    """Cut Cross-Entropy `linear_cross_entropy(reduction="none")`: its Triton kernels on CUDA, its torch.compile
    implementation elsewhere (chosen explicitly), default gradient filtering."""

    name = "cce"
    distribution = "cut-cross-entropy"
    needs_warmup = True

    def __init__(self):
        self._impl = None

    def warmup_key(self, workload):
        return _grad_mode_key(self.name, workload)

    def check(self, workload, device):
        _import("cut_cross_entropy", self.distribution)
        self._impl = "cce" if device.type == "cuda" else "torch_compile"

    def token_logprobs(self, hidden, weight, targets):
        from cut_cross_entropy import linear_cross_entropy

        impl = self._impl or ("cce" if hidden.is_cuda else "torch_compile")
        loss = linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", impl=impl)
        return -loss.float()


class TorchLceProvider(Provider):
    """`torch.nn.functional.linear_cross_entropy(reduction="none")` with its chunked path where the installed torch
    has one. On CUDA its automatic chunking (`LinearCrossEntropyOptions()`). On CPU float32 the automatic pick is a
    CUDA-tuned fallback (16-row chunks at N = 1024, D = 1024, V = 32000, about 8x slower than its own unchunked
    path), so there the chunk is fixed at `CPU_CHUNK_ROWS` rows: at most 160 MB of float32 logits at V = 152k."""

    name = "torch-lce"
    CPU_CHUNK_ROWS = 256
    needs_warmup = True  # its first call in a process loads what it needs (2.8 s of CPU time at any shape)

    def warmup_key(self, workload):
        return _grad_mode_key(self.name, workload)

    def check(self, workload, device):
        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")

    def token_logprobs(self, hidden, weight, targets):
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        kwargs = {}
        if options_cls is not None:
            chunk = None if hidden.is_cuda else self.CPU_CHUNK_ROWS
            kwargs["options"] = options_cls() if chunk is None else options_cls(batch_chunk_size=chunk)
        loss = F.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            targets.reshape(-1),
            reduction="none",
            ignore_index=IGNORE_INDEX,
            **kwargs,
        )
        return -loss.float().view(targets.shape)


def all_providers() -> dict[str, Provider]:
    """Every provider by name, aam_fast's first."""
    providers = [
        AamProvider("torch"),
        AamProvider("native"),
        AamProvider("triton"),
        AamLocalProvider("triton"),
        AamProvider("torch", AamProvider.FILTER_EPS),
        AamProvider("triton", AamProvider.FILTER_EPS),
        NaiveProvider(),
        NaiveCompileProvider(),
        LigerProvider(),
        CceProvider(),
        TorchLceProvider(),
    ]
    return {p.name: p for p in providers}


PROVIDER_NAMES = tuple(all_providers())


def is_peer(name: str) -> bool:
    return not name.startswith("aam-")
