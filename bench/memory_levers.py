"""Peak memory and step time of one AAM-PR reward-model step under the large-model levers, each in its own process.

A Llama built from a config (random weights, no download; default: a Qwen2-0.5B-like shape, 494M parameters with
the tied 151,936-token vocabulary) takes optimizer steps of the PR loss on ``--pairs`` random pairs of ``--tokens``
tokens each (chosen and rejected in one forward, as train-rm runs them), in four settings:

- ``full``: every weight trains, the reference is a frozen copy of the model;
- ``full+gc``: the same with activation checkpointing of every decoder layer;
- ``lora``: LoRA adapters (``--lora-r``) on every linear layer of the decoder layers, the reference is the same model
  with its adapters disabled (no copy);
- ``lora+copy``: the same adapters with a separate frozen copy as the reference (what a trainer without the
  adapters-off reference keeps).

Peak RSS is the child process's high-water mark (``ru_maxrss``); the step time is the last of ``--steps`` steps (the
first pays one-time costs). Run: ``python -m bench.memory_levers [--tokens 1024] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("full", "full+gc", "lora", "lora+copy")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aam_fast import AAMLoss
    from aam_fast.modeling import (
        AdapterReference,
        ReferenceModel,
        RewardModel,
        add_lora,
        disable_dropout,
        enable_checkpointing,
    )

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.tokens),
        tie_word_embeddings=True,
    )
    model = RewardModel(LlamaForCausalLM(config))
    disable_dropout(model)
    lora = args.variant.startswith("lora")
    if lora:
        add_lora(model.lm, model.backbone, r=args.lora_r, alpha=2.0 * args.lora_r, dropout=0.0,
                 target_modules=None, trainable_layers=None)  # fmt: skip
    if args.variant == "full+gc":
        enable_checkpointing(model.lm)
    reference = AdapterReference(model) if args.variant == "lora" else ReferenceModel(model)
    return model, reference, AAMLoss(margin="pr", backend="torch")


def step(model, reference, loss_fn, optimizer, batch):
    import torch

    optimizer.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], batch["attention_mask"], reference=reference)
    result = loss_fn(
        out.hidden[:, :-1],
        model.lm_head_weight,
        batch["labels"][:, 1:],
        out.rewards,
        ref_hidden=out.ref_hidden[:, :-1],
        ref_weight=reference.lm_head_weight,
    )
    result.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return float(result.loss)


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, reference, loss_fn = build(args)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    rows = 2 * args.pairs
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (rows, args.tokens), generator=generator)
    labels = input_ids.clone()
    labels[:, : args.tokens // 4] = -100  # the prompt quarter carries no loss
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = step(model, reference, loss_fn, optimizer, batch)
        seconds.append(time.perf_counter() - started)
    return {
        "variant": args.variant,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "step_seconds": seconds[-1],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="run one setting in this process")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    results = []
    for variant in args.variants:
        command = [sys.executable, "-m", "bench.memory_levers", "--variant", variant]
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "pairs", "tokens", "steps"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        command += ["--lora-r", str(args.lora_r), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
