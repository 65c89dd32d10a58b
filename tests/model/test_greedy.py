"""Greedy decoding of packed prompts equals decoding each prompt alone with the full logits."""
import pytest
import torch

from megatron_tokweight.model.gpt import ModelConfig

VOCAB, SEQ = 50, 32  # the embedding is padded to 128: the padding must never be chosen


def reference_decode(model, prompt, max_new_tokens, stops, limit):
    """One prompt at a time, every position's logits computed (no selection, no packing)."""
    from megatron_tokweight.model.gpt import packed_logits

    out = []
    with torch.no_grad():
        while True:
            seq = list(prompt) + out
            n = len(seq)
            cu = torch.tensor([0, n], dtype=torch.int32)
            batch = {"tokens": torch.tensor([seq]), "position_ids": torch.arange(n).reshape(1, n),
                     "cu_seqlens": cu, "cu_seqlens_padded": cu.clone(), "max_seqlen": torch.tensor(n)}
            logits = packed_logits(model, batch)[-1, 0]  # [padded vocab]
            out.append(int(logits[:VOCAB].argmax()))
            if out[-1] in stops or len(out) == max_new_tokens or n + 1 >= limit:
                return out


@pytest.fixture(scope="module")
def model(rank_group):
    from megatron_tokweight.model.gpt import build_gpt_model

    torch.manual_seed(0)
    # a wide init: a random model's greedy choices then differ from prompt to prompt
    config = ModelConfig(vocab_size=VOCAB, seq_length=SEQ, num_layers=2, hidden_size=32,
                         num_attention_heads=4, init_method_std=0.5)
    return build_gpt_model(config, tp_group=rank_group)


def test_packed_greedy_decoding_matches_one_prompt_at_a_time(model):
    from megatron_tokweight.model.greedy import greedy_decode

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 9, 1, 14, 28, 6)]
    free = [reference_decode(model, p, 6, set(), SEQ) for p in prompts]
    assert len({tuple(o) for o in free}) > 2, "the test model gives (nearly) one answer to every prompt"
    # a stop id that ends some prompts early: the first token one of them produces
    stop = free[1][0]
    expected = [reference_decode(model, p, 6, {stop}, SEQ) for p in prompts]
    assert any(len(e) < 6 for e in expected) and any(len(e) == 6 for e in expected)
    model.train()
    # a small forward budget splits the prompts over several forwards per step
    for budget in (10_000, 20):
        got = greedy_decode(model, prompts, 6, [stop], VOCAB, tokens_per_forward=budget)
        assert got == expected, f"tokens_per_forward={budget}"
    assert model.training  # the caller's mode is restored
    # the 28-token prompt stops at the position table (32): 4 tokens
    assert len(expected[4]) <= SEQ - 28


def test_greedy_decode_refuses_prompts_without_room(model):
    from megatron_tokweight.model.greedy import greedy_decode

    with pytest.raises(ValueError, match=r"prompt 1 has 32 tokens.*1 to 31"):
        greedy_decode(model, [[1, 2], [3] * SEQ], 2, [], VOCAB)
    with pytest.raises(ValueError, match=r"prompt 0 has 0 tokens"):
        greedy_decode(model, [[]], 2, [], VOCAB)
