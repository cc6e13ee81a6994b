"""Input checks for the fused linear log-prob ops: fail loudly before any kernel runs."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the largest finite float32: a value the losses and reward tables hold (a float64 beyond it turns into inf there)
FLOAT32_MAX = torch.finfo(torch.float32).max


def check_linear_logprobs_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> None:
    """Raise a ValueError naming the argument when the inputs of `linear_logprobs` do not fit together.

    Checks dtypes, shapes (D ≥ 1), devices, `temperature > 0` and that every target lies in `[0, V)` or equals
    `ignore_index` (the range check reads the targets once; it is the only host sync).
    """
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    check_materialised(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if weight.shape[1] == 0:
        raise ValueError(
            f"the hidden size D (hidden's last dim, weight's dim 1) must be at least 1, got hidden shape "
            f"{tuple(hidden.shape)} and weight shape {tuple(weight.shape)}"
        )
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight's D={weight.shape[1]}, got hidden shape {tuple(hidden.shape)}"
        )
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    devices = {("hidden", hidden.device), ("weight", weight.device), ("targets", targets.device)}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V]=[{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"bias must be a float tensor, got {bias.dtype}")
        devices.add(("bias", bias.device))
    if len({device for _, device in devices}) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in sorted(devices, key=lambda x: x[0]))
        raise ValueError(f"all inputs must be on one device, got {listed}")
    check_number("temperature", temperature, above=0.0)
    if targets.numel():
        vocab = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(
                f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first} "
                f"({int(bad.sum())} such entries)"
            )


def check_grad_filter_eps(grad_filter_eps: float | None) -> float:
    """`grad_filter_eps` as a float threshold (0.0 when None: no filtering); ValueError unless in [0, 1)."""
    if grad_filter_eps is None:
        return 0.0
    if isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, (int, float)):
        raise ValueError(f"grad_filter_eps must be a float in [0, 1) or None, got {grad_filter_eps!r}")
    if not 0.0 <= grad_filter_eps < 1.0:
        raise ValueError(f"grad_filter_eps must lie in [0, 1) (a softmax probability), got {grad_filter_eps!r}")
    return float(grad_filter_eps)


def range_problem(value, *, minimum=None, maximum=None, above=None, below=None) -> str | None:
    """What is wrong with ``value`` as a real number in a range: not a number, not finite (NaN or ±inf is never a
    setting), or outside ``minimum``/``maximum`` (inclusive) or ``above``/``below`` (exclusive); None when nothing
    is. The one check of a number argument, for the CLI's flags (:mod:`aam_fast.training.options`) and the API."""
    bounds = [(">=", minimum), (">", above), ("<=", maximum), ("<", below)]
    wanted = " and ".join(f"{sign} {bound}" for sign, bound in bounds if bound is not None) or "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number {wanted}".removesuffix(" a finite number") + f", got {value!r}"
    # an int of any size compares exactly; only a float can be NaN or infinite
    bad = isinstance(value, float) and not math.isfinite(value)
    bad |= minimum is not None and value < minimum
    bad |= maximum is not None and value > maximum
    bad |= above is not None and not value > above
    bad |= below is not None and not value < below
    return f"must be {wanted}, got {value}" if bad else None


def check_number(name: str, value, *, optional: bool = False, **bounds) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number within ``bounds`` (:func:`range_problem`'s
    keywords); None passes when ``optional``."""
    if value is None and optional:
        return
    problem = range_problem(value, **bounds)
    if problem:
        raise ValueError(f"{name} {problem}")


def check_float32_range(**numbers) -> None:
    """ValueError naming the first of ``numbers`` (None skipped) that float32, where the losses and the reward
    tables compute, cannot hold: a finite float64 such as 1e300 would turn into inf there, and the loss or the
    rewards into inf or NaN."""
    for name, value in numbers.items():
        if value is not None and abs(value) > FLOAT32_MAX:
            raise ValueError(f"{name} must lie within float32's +-{FLOAT32_MAX:.3g}, where it is computed, got {value}")


def check_tensors(**tensors) -> None:
    """ValueError naming the first of ``tensors`` (None skipped) that is not a torch.Tensor (a list, a NumPy
    array): before anything reads its shape."""
    for name, tensor in tensors.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")


def check_materialised(**tensors) -> None:
    """ValueError naming the first of ``tensors`` (None skipped) on the meta device: it has a shape but no values,
    so no loss can be computed from it (load or materialise the weights first, e.g. ``to_empty`` and a load)."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            raise ValueError(f"{name} is on the meta device (a shape without values): load or materialise it first")
