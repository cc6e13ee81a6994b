"""Reward model, reference, trunk sharing, export and RewardScorer on the tiny Llama built by the test session
(tests/conftest.py: `aam_fast.testing.LAYERS` decoder layers, tied embeddings, a tokenizer without a chat template)."""

import pytest
import torch

from aam_fast import linear_logprobs
from aam_fast.data import PairEncoder, choose_pad_token_id, collate_pairs, load_preferences, pad_sequences
from aam_fast.modeling import (
    LM_HEAD_FILE,
    ReferenceModel,
    RewardModel,
    RewardScorer,
    last_token_index,
    load_causal_lm,
    load_reward_model,
    save_reward_model,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def model_dir(tiny_paths):
    return tiny_paths["model"]


@pytest.fixture
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    choose_pad_token_id(tok)
    return tok


@pytest.fixture
def hh_pairs(tiny_paths):
    return load_preferences(tiny_paths["hh"], limit=5).pairs


def make_model(model_dir, seed=0, **kwargs):
    torch.manual_seed(seed)
    return RewardModel(load_causal_lm(model_dir), **kwargs)


def batch_of(tokenizer, pairs, max_length=72):
    encoded, _ = PairEncoder(tokenizer, max_length).encode_all(pairs)
    return encoded, collate_pairs(encoded, tokenizer.pad_token_id)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    with pytest.raises(ValueError, match="without any attended token"):
        last_token_index(torch.zeros(1, 3, dtype=torch.long))


def test_reward_is_read_at_last_attended_token(model_dir, tokenizer, hh_pairs):
    model = make_model(model_dir).eval()
    encoded, batch = batch_of(tokenizer, hh_pairs[:3])
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"])
        assert out.rewards.shape == (6,) and out.rewards.dtype == torch.float32
        assert out.hidden.shape[:2] == batch["input_ids"].shape
        # Each row alone (no padding) gives the same reward as inside the right-padded batch.
        for row, seq in enumerate([e.chosen for e in encoded] + [e.rejected for e in encoded]):
            alone = model(torch.tensor([seq.ids]), torch.ones(1, len(seq.ids), dtype=torch.long)).rewards
            torch.testing.assert_close(alone[0], out.rewards[row], atol=1e-5, rtol=1e-5)


def test_hidden_states_give_the_lm_log_probs(model_dir, tokenizer, hh_pairs):
    """The final hidden states with linear_logprobs reproduce the causal LM's own log-softmax of its logits."""
    model = make_model(model_dir).eval()
    _, batch = batch_of(tokenizer, hh_pairs[:2])
    targets = batch["labels"][:, 1:]
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"])
        ours = linear_logprobs(out.hidden[:, :-1], model.lm_head_weight, targets)
        logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = targets != -100
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours[mask].double(), expected[mask], atol=1e-4, rtol=1e-4)
    assert (ours[~mask] == 0).all()


def test_trainable_layers_freeze_the_trunk(model_dir):
    model = make_model(model_dir, trainable_layers=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = model.lm.config.num_hidden_layers
    last = layers - 1
    assert "score.weight" in trainable and "lm.model.norm.weight" in trainable
    assert any(n.startswith(f"lm.model.layers.{last}.") for n in trainable)
    assert any(n.startswith(f"lm.model.layers.{last - 1}.") for n in trainable)
    assert not any(n.startswith((f"lm.model.layers.{last - 2}.", "lm.model.embed_tokens")) for n in trainable)
    assert not model.lm_head_weight.requires_grad  # tied to the frozen embedding
    with pytest.raises(ValueError, match="trainable_layers must be in"):
        make_model(model_dir, trainable_layers=layers + 1)


def test_shared_trunk_reference_matches_a_full_reference(model_dir, tokenizer, hh_pairs):
    """The top-K reference on the shared trunk equals a full frozen copy, before and after training moves the
    model; trunk_output + trunk_hidden reproduces the plain forward."""
    model = make_model(model_dir, trainable_layers=2)
    top_ref = ReferenceModel(model)
    initial = make_model(model_dir)
    full_ref = ReferenceModel(initial)
    assert top_ref.top_only and not full_ref.top_only
    assert sum(p.numel() for p in top_ref.parameters()) < sum(p.numel() for p in full_ref.parameters()) / 2
    _, batch = batch_of(tokenizer, hh_pairs[:3])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(ids, mask, reference=top_ref)
    torch.testing.assert_close(out.ref_hidden, out.hidden.detach())
    out.rewards.sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(0.05 * torch.randn_like(p))
    out = model(ids, mask, reference=top_ref)
    expected = initial(ids, mask, reference=full_ref).ref_hidden  # a full frozen copy of the initial weights
    torch.testing.assert_close(out.ref_hidden, expected, atol=1e-5, rtol=1e-5)
    assert (out.hidden - out.ref_hidden).abs().max() > 1e-3
    trunk = model.trunk_output(ids, mask)
    fed = model(ids, mask, reference=top_ref, trunk_hidden=trunk)
    torch.testing.assert_close(fed.rewards, out.rewards)
    torch.testing.assert_close(fed.ref_hidden, out.ref_hidden)
    assert len(model.decoder_layers) == model.lm.config.num_hidden_layers  # the layer list is restored after feeding


def test_export_loads_in_auto_model_for_sequence_classification(model_dir, tokenizer, hh_pairs, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = make_model(model_dir, seed=3).eval()
    save_reward_model(model, tokenizer, tmp_path / "rm", metadata={"max_length": 72})
    config = AutoConfig.from_pretrained(tmp_path / "rm")
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert not (tmp_path / "rm" / LM_HEAD_FILE).exists()  # tied: the embedding is the head
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    encoded, batch = batch_of(tokenizer, hh_pairs[:3])
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"]).rewards
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        single = hf(input_ids=torch.tensor([encoded[0].chosen.ids])).logits[0, 0]
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(single, ours[0], atol=1e-5, rtol=1e-5)
    # The saved tokenizer carries the template training used, so a user's apply_chat_template matches.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "rm")
    text = saved.apply_chat_template(hh_pairs[0].prompt + hh_pairs[0].chosen, tokenize=False)
    assert (
        saved(text, add_special_tokens=False)["input_ids"][-20:]
        == PairEncoder(tokenizer).encode(hh_pairs[0]).chosen.ids[-20:]
    )


def test_untied_head_round_trip(model_dir, tokenizer, hh_pairs, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(config)
    model = RewardModel(lm, train_lm_head=True)
    assert not model.tied and model.lm_head_weight.requires_grad
    with torch.no_grad():
        model.lm_head_weight.normal_()
    save_reward_model(model, tokenizer, tmp_path / "rm")
    assert (tmp_path / "rm" / LM_HEAD_FILE).is_file()
    loaded, _, metadata = load_reward_model(tmp_path / "rm")
    assert metadata["lm_head_file"] == LM_HEAD_FILE and not loaded.tied
    torch.testing.assert_close(loaded.lm_head_weight, model.lm_head_weight)
    _, batch = batch_of(tokenizer, hh_pairs[:2])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(batch["input_ids"], batch["attention_mask"]).rewards,
            model.eval()(batch["input_ids"], batch["attention_mask"]).rewards,
        )


def test_reward_scorer_matches_the_model(model_dir, tokenizer, hh_pairs, tmp_path):
    model = make_model(model_dir, seed=5).eval()
    save_reward_model(model, tokenizer, tmp_path / "rm", metadata={"max_length": 72})
    scorer = RewardScorer(tmp_path / "rm", device="cpu", dtype=torch.float32, batch_size=3)
    assert scorer.encoder.max_length == 72
    prompts = [p.prompt for p in hh_pairs]
    completions = [p.chosen[0]["content"] for p in hh_pairs]
    rewards = scorer(prompts, completions)
    assert rewards.shape == (5,) and rewards.dtype == torch.float32
    encoder = PairEncoder(tokenizer, 72)
    expected = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            seq = encoder.encode_sequence(prompt, completion)
            batch = pad_sequences([(seq.ids, seq.prompt_len)], tokenizer.pad_token_id)
            expected.append(model(batch["input_ids"], batch["attention_mask"]).rewards[0])
    torch.testing.assert_close(rewards, torch.stack(expected), atol=1e-5, rtol=1e-5)
    # String prompts are scored as standard text: prompt + completion + eos.
    plain = scorer(["Once upon a time"], [" there was a cat."])
    seq = encoder.encode_sequence("Once upon a time", " there was a cat.")
    assert seq.ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        direct = model(torch.tensor([seq.ids]), torch.ones(1, len(seq.ids), dtype=torch.long)).rewards
    torch.testing.assert_close(plain, direct, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="differ in length"):
        scorer(["a"], [])
