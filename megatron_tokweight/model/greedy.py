"""Greedy decoding with a trained GPT model: every prompt continued by its most likely tokens.

Used to score exact-match answers (benchmarks/bench_effect_mixture.py). All unfinished prompts
run together as one packed THD stream per new token (each its own segment with restarted
positions, so no prompt sees another), and only each segment's last position goes through the
output layer: a large vocabulary (Qwen's 151k) costs one row of logits per prompt, not one per
token. There is no KV cache: a step reruns the whole prefixes, which suits short answers.
"""
from typing import Iterable, List, Optional, Sequence

# tokens per forward: the prompts are run in groups of at most this many tokens
DEFAULT_TOKENS_PER_FORWARD = 8192


def _stream(prefixes: Sequence[Sequence[int]]):
    """One THD micro-batch (the keys `packed_logits` reads) holding `prefixes` end to end."""
    import torch

    lengths = [len(p) for p in prefixes]
    bounds = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    cu = bounds.to(torch.int32)
    tokens = torch.tensor([t for p in prefixes for t in p], dtype=torch.int64).reshape(1, -1)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]).reshape(1, -1)
    batch = {"tokens": tokens, "position_ids": positions, "cu_seqlens": cu, "cu_seqlens_padded": cu.clone(),
             "max_seqlen": torch.tensor(max(lengths), dtype=torch.int64)}
    return batch, bounds[1:] - 1  # the last position of each prefix


def _groups(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Consecutive indices whose lengths sum to at most `budget` (a longer one alone)."""
    groups, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def next_tokens(model, prefixes: Sequence[Sequence[int]], vocab_size: int) -> List[int]:
    """The most likely next token (among the first `vocab_size`, not the padding of the
    embedding) after each prefix, from one forward of the packed prefixes."""
    from megatron_tokweight.data.thd_batch import packed_seq_params

    batch, last = _stream(prefixes)

    def last_positions(module, args, output):  # decoder output [T, 1, h] -> [P, 1, h]
        return output.index_select(0, last)

    handle = model.decoder.register_forward_hook(last_positions)
    try:
        # every TP rank gets the whole vocabulary (the ranks must pass the same prefixes)
        logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                       packed_seq_params=packed_seq_params(batch), runtime_gather_output=True)
    finally:
        handle.remove()
    # GPTModel returns [b, s, v] = [1, P, v]
    return logits[0, :, :vocab_size].argmax(-1).tolist()


def greedy_decode(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Iterable[int],
                  vocab_size: int, max_positions: Optional[int] = None,
                  tokens_per_forward: int = DEFAULT_TOKENS_PER_FORWARD) -> List[List[int]]:
    """Greedy continuations of `prompts` (token id lists); each ends with the first stop id it
    produced, after `max_new_tokens` tokens, or when it reaches `max_positions` (default: the
    model's position table). Runs in eval mode under no_grad; the model's mode is restored."""
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = int(max_positions if max_positions is not None else model.max_sequence_length)
    for i, prompt in enumerate(prompts):
        if not 1 <= len(prompt) < limit:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; it must hold 1 to {limit - 1} "
                             f"(the model has {limit} positions and one is needed for an answer)")
    stops = set(int(s) for s in stop_ids)
    outputs: List[List[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            while active:
                prefixes = [list(prompts[i]) + outputs[i] for i in active]
                chosen: List[int] = []
                for group in _groups([len(p) for p in prefixes], tokens_per_forward):
                    chosen += next_tokens(model, [prefixes[j] for j in group], vocab_size)
                still = []
                for i, token, prefix in zip(active, chosen, prefixes):
                    outputs[i].append(token)
                    if token not in stops and len(outputs[i]) < max_new_tokens and len(prefix) + 1 < limit:
                        still.append(i)
                active = still
    finally:
        model.train(was_training)
    return outputs
