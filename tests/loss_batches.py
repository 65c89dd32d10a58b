"""The global batch of the loss invariance matrices (tests/loss and tests/megatron): packed-row-like
rows with prompts, weighted answers, a zero-weight target and tail padding."""
import math

import torch

VOCAB, HIDDEN, SEQ, ROWS, PAD = 16, 8, 12, 6, 0
TASKS, DATASETS = ("caption", "qa"), ("mix_a", "mix_b")


def global_batch():
    """Packed-row-like global batch [ROWS, SEQ]: 1-3 samples per row, a prompt (weight 0), answer
    tokens weighted c / sqrt(n) x task factor (some loss tokens weighted 0), tail padding whose
    label is the pad id (weight 0)."""
    g = torch.Generator().manual_seed(1234)
    keys = ("tokens", "labels", "loss_mask", "loss_weights", "task_ids")
    batch = {k: torch.zeros(ROWS, SEQ, dtype=torch.float32 if k in ("loss_mask", "loss_weights") else torch.int64) for k in keys}
    batch["task_ids"].fill_(-1)
    num_samples = []
    for row in range(ROWS):
        start, count = 0, 0
        while start < SEQ - 3 and (count == 0 or int(torch.randint(0, 4, (1,), generator=g)) > 0):
            length = min(int(torch.randint(3, 8, (1,), generator=g)), SEQ - start)
            prompt = int(torch.randint(1, length - 1, (1,), generator=g))
            task = int(torch.randint(0, len(TASKS), (1,), generator=g))
            toks = torch.randint(1, VOCAB, (length,), generator=g)
            seg = slice(start, start + length)
            batch["tokens"][row, seg] = toks
            batch["labels"][row, start : start + length - 1] = toks[1:]
            batch["labels"][row, start + length - 1] = PAD
            batch["task_ids"][row, seg] = task
            answer = slice(start + prompt - 1, start + length - 1)
            n = answer.stop - answer.start
            batch["loss_mask"][row, answer] = 1.0
            batch["loss_weights"][row, answer] = (0.7 if task == 0 else 1.0) * 2.0 / math.sqrt(n)
            start, count = start + length, count + 1
        num_samples.append(count)
    # a dropped loss token (weight 0 on a target, as a token rule may give)
    row, col = batch["loss_mask"].nonzero()[5].tolist()
    batch["loss_weights"][row, col] = 0.0
    batch["num_samples"] = torch.tensor(num_samples, dtype=torch.int64)
    batch["dataset_id"] = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.int64)
    return batch
