"""The policy as GRPO loads, configures and saves it: a causal LM with float32 master weights, left padding and a
pad token; its generation settings; its weights to and from ``save_pretrained`` folders (final export and
checkpoints alike)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ...data import choose_pad_token_id
from ...modeling.io import load_causal_lm, load_tokenizer, quiet_transformers
from ...modeling.layers import backbone_of, disable_dropout, enable_checkpointing, train_top_layers
from ...modeling.lora import ADAPTER_FILE, adapter_state, has_lora, lora_scaling, merge_lora_state
from ...training.distributed import DistContext


def load_policy(
    path: str, device: torch.device, *, load_kwargs: dict | None = None, gradient_checkpointing: bool = False
):
    """``(model, tokenizer)``: float32 master weights with dropout off, so rollout, old and new log-probs are one
    function of the weights (eval mode; training mode with dropout off under ``gradient_checkpointing``, which
    transformers applies in training mode only), left padding, a pad token
    (:func:`aam_fast.data.choose_pad_token_id`). ``load_kwargs`` go to ``from_pretrained``."""
    load_kwargs = load_kwargs or {}
    model = load_causal_lm(path, dtype=torch.float32, what="--policy", **load_kwargs).to(device)
    tokenizer = load_tokenizer(path, "--policy", trust_remote_code=load_kwargs.get("trust_remote_code", False))
    tokenizer.padding_side = "left"
    choose_pad_token_id(tokenizer)
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"--policy {path!r}: logit soft-capping is not supported by the fused log-prob op")
    disable_dropout(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.train()
    else:
        model.eval()
    return model, tokenizer


def train_policy_top_layers(policy: nn.Module, count: int) -> None:
    """Train only the top ``count`` decoder layers and the final norm; the embeddings and the LM head stay frozen,
    so the frozen trunk runs without autograd and the fused op skips the LM-head weight gradient."""
    train_top_layers(backbone_of(policy), count)
    policy.get_output_embeddings().requires_grad_(False)


def eos_token_ids(model, tokenizer) -> list[int]:
    """The union of the tokenizer's EOS and the generation config's EOS ids (chat models end turns with both)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the policy has no EOS token: generation could never stop")
    return sorted(ids)


def generation_config(cfg, tokenizer, eos_ids: list[int]):
    """Sampling settings of every rollout: ``cfg``'s temperature/top-p/top-k, no repetition penalty, KV cache."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        num_beams=1,
        repetition_penalty=1.0,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (a tied LM head and embedding), each group of two or more."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def write_policy(
    ctx: DistContext, engine: nn.Module, policy: nn.Module, tokenizer, folder: Path, tied: list[list[str]]
) -> None:
    """``folder`` as a ``save_pretrained`` folder with the tokenizer, from the full weights gathered to rank 0
    (a collective under torchrun). ``tied``: :func:`tied_names` of the plain policy, so that a tied head is
    written once, as in a one-process save."""
    full = ctx.full_state_dict(engine)
    if ctx.is_main:
        state = {name.removeprefix("model."): tensor for name, tensor in full.items()}
        adapters = adapter_state(state)
        if adapters:  # the merged weights as the policy, the adapters alone beside them
            folder.mkdir(parents=True, exist_ok=True)
            save_file(adapters, str(folder / ADAPTER_FILE))
            state = merge_lora_state(state, lora_scaling(policy))
        for names in tied:
            present = [name for name in names if name in state]
            for name in names:
                if present:
                    state[name] = state[present[0]]
        folder.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            policy.save_pretrained(folder, state_dict=state)
        tokenizer.save_pretrained(folder)
    ctx.barrier()


def load_policy_weights(policy: nn.Module, folder: Path) -> None:
    """Load the weights of a :func:`write_policy` folder into ``policy`` in place (parameters keep their identity);
    a tied head absent from the files takes its embedding's tensor. ValueError when the names do not match."""
    from safetensors.torch import load_file

    if has_lora(policy):  # the base weights stay the initial ones; the adapters come from the checkpoint
        if not (folder / ADAPTER_FILE).is_file():
            raise ValueError(f"{folder}: no {ADAPTER_FILE}; it was not written by a LoRA run")
        adapters = load_file(str(folder / ADAPTER_FILE))
        if set(adapters) != set(adapter_state(policy.state_dict())):
            raise ValueError(f"{folder}: its adapters do not match this policy's (--lora-r, --lora-target-modules)")
        policy.load_state_dict(adapters, strict=False)
        return
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(str(file)))
    if not tensors:
        raise ValueError(f"{folder}: no model*.safetensors weights")
    for names in tied_names(policy):
        present = [name for name in names if name in tensors]
        for name in names:
            if present:
                tensors.setdefault(name, tensors[present[0]])
    try:
        policy.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{folder}: its weights do not fit the policy ({exc})") from None


REFERENCE_FILE = "reference.safetensors"  # a checkpoint's synced reference (--sync-ref-model)


def write_reference(ctx: DistContext, reference: nn.Module, folder: Path) -> None:
    """The reference's parameters into ``folder/reference.safetensors`` (rank 0; every rank holds the whole copy)."""
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous().clone() for name, p in reference.named_parameters()}
        save_file(tensors, str(folder / REFERENCE_FILE))
    ctx.barrier()


def load_reference(reference: nn.Module, folder: Path) -> None:
    """The parameters :func:`write_reference` wrote into ``reference``, in place; ValueError when the file is
    missing or its names do not match."""
    from safetensors.torch import load_file

    path = folder / REFERENCE_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {REFERENCE_FILE}; it was not written by a --sync-ref-model run")
    tensors = load_file(str(path))
    parameters = dict(reference.named_parameters())
    if set(tensors) != set(parameters):
        raise ValueError(f"{path}: its parameters do not match the reference's")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
