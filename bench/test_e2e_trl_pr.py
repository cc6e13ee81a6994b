"""bench.e2e.trl_pr (the TRL-user AAM-PR baseline) computes train-rm's AAM-PR loss: one fixed batch of the tiny
model, the same initial weights and the policy moved away from the reference so the margin is not zero."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")

from aam_fast.data import FALLBACK_CHAT_TEMPLATE  # noqa: E402
from aam_fast.testing import build_tiny_assets, trl_records  # noqa: E402

from .e2e.trl_pr import AAMPRRewardTrainer, prompt_messages, response_spans, tokenize_with_spans  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl-pr")
    paths = build_tiny_assets(folder)
    records = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in trl_records(7, 16)
    ]
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"model": paths["model"], "data": data, "folder": folder}


def test_prompt_and_response_spans(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    record = json.loads(tiny["data"].read_text().splitlines()[0])
    assert prompt_messages(record["chosen"], record["rejected"]) == record["chosen"][:-1]
    same = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    assert prompt_messages(same, same) == same[:1]  # never the whole conversation

    from aam_fast.data import PairEncoder

    encoded = PairEncoder(tokenizer).encode_sequence(record["chosen"][:-1], record["chosen"][-1:])
    spans = tokenize_with_spans(record, tokenizer)
    assert spans["chosen_ids"] == encoded.ids and spans["chosen_prompt_len"] == encoded.prompt_len
    with pytest.raises(ValueError, match="conversational record"):
        tokenize_with_spans({"chosen": "a", "rejected": "b"}, tokenizer)


def test_one_batch_loss_matches_train_rm(tiny):
    import datasets
    from transformers import AutoTokenizer
    from trl import RewardConfig

    from aam_fast.modeling import save_reward_model
    from aam_fast.stages.rm.config import RMConfig
    from aam_fast.stages.rm.trainer import RMTrainer, micro_batch_indices

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = RMTrainer(
            RMConfig(
                model=tiny["model"],
                data=str(tiny["data"]),
                output=str(tiny["folder"] / "aam"),
                margin="pr",
                dev_fraction=0.0,
                batch_size=4,
                max_steps=1,
                progress=False,
            )
        )
        initial = save_reward_model(ours.model, ours.tokenizer, tiny["folder"] / "initial")
        tokenizer = AutoTokenizer.from_pretrained(initial)
        train = response_spans(datasets.load_dataset("json", data_files=str(tiny["data"]), split="train"), tokenizer)
        config = RewardConfig(
            output_dir=str(tiny["folder"] / "trl"),
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            disable_tqdm=True,
        )
        theirs = AAMPRRewardTrainer(model=str(initial), args=config, train_dataset=train, processing_class=tokenizer)
        # Move both policies away from their (identical) references by the same amount: a non-zero margin.
        generator = torch.Generator().manual_seed(0)
        their_params = dict(theirs.model.model.named_parameters())
        with torch.no_grad():
            for name, param in ours.model.backbone.named_parameters():
                step = 0.02 * torch.randn(param.shape, generator=generator)
                param.add_(step)
                their_params[name].add_(step)

        ours.model.train()
        theirs.model.train()
        batch = ours._micro_batch(0)
        result, rewards = ours._micro_batch_loss(ours.model, batch)
        ids = micro_batch_indices(len(train), 4, ours.cfg.seed, 0)[1]
        their_batch = theirs.data_collator([theirs.train_dataset[i] for i in ids])
        assert torch.equal(their_batch["input_ids"], batch["input_ids"])
        their_loss = theirs.compute_loss(theirs.model, their_batch)
        ours.ctx.close()
    finally:
        torch.set_num_threads(threads)
    margin = theirs._metrics["train"]["aam_margin/mean"][-1]
    assert result.margin.abs().min() > 1e-3  # the check would be empty with a zero margin
    assert margin == pytest.approx(result.margin.mean().item(), rel=1e-4, abs=1e-6)
    assert their_loss.item() == pytest.approx(result.loss.item(), rel=1e-5, abs=1e-6)
    assert theirs._total_train_tokens == int(batch["attention_mask"].sum())
