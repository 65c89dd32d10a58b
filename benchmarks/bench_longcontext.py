"""Long-context weighting cost on CPU, side by side in one process:

1. unfrozen scorer: `OnlineScorer.weights` (a no_grad full-context forward plus the strided
   short-context windows) vs a plain training step (forward, weighted cross-entropy, backward,
   AdamW) on the same micro-batch of packed rows; timed alternately, best of the repeats;
2. offline scorer: `score_dataset` (what `tokweight score` runs per TP rank) tokens/s on a
   prepared dataset, and the tokens it sends through the model per dataset token.

n / N = 1/4 and stride = 3n/4, the ratios of the released Helm et al. configuration
(n = 8192, stride = 6144, N = 32768). Writes benchmarks/results/bench_longcontext.json.

    python benchmarks/bench_longcontext.py [--seq-length 1024] [--rows 2] [--hidden 128] [--layers 4]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def packed_rows(rows, length, vocab, rng):
    """Collated rows of random tokens, pieces of random lengths (median ~length/3) end to end."""
    batch = {key: [] for key in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens")}
    counts, longest = [], []
    for _ in range(rows):
        tokens = rng.integers(0, vocab, length)
        labels = np.zeros(length, np.int64)
        mask = np.zeros(length, np.float32)
        positions = np.zeros(length, np.int64)
        bounds = [0]
        while bounds[-1] < length:
            bounds.append(min(length, bounds[-1] + int(rng.integers(length // 8, length // 2))))
        for a, b in zip(bounds[:-1], bounds[1:]):
            labels[a:b - 1] = tokens[a + 1:b]
            mask[a:b - 1] = 1
            positions[a:b] = np.arange(b - a)
        cu = np.full(length + 1, -1, np.int32)
        cu[:len(bounds)] = bounds
        for key, value in zip(batch, (tokens, labels, mask, positions, cu)):
            batch[key].append(torch.from_numpy(np.asarray(value)))
        counts.append(len(bounds) - 1)
        longest.append(int(np.diff(bounds).max()))
    out = {key: torch.stack(value) for key, value in batch.items()}
    out["cu_seqlens_padded"] = out["cu_seqlens"].clone()
    out["loss_weights"] = out["loss_mask"].clone()
    out["num_segments"] = torch.tensor(counts)
    out["max_seqlen"] = torch.tensor(longest)
    return out


def bench_online(args, group):
    from megatron_tokweight.longcontext import LongContextConfig
    from megatron_tokweight.longcontext.scorer_online import OnlineScorer
    from megatron_tokweight.loss import weighted_cross_entropy
    from megatron_tokweight.model.gpt import ModelConfig, build_gpt_model, row_logits

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, seq_length=args.seq_length, num_layers=args.layers,
                         hidden_size=args.hidden, num_attention_heads=args.heads)
    model = build_gpt_model(config, tp_group=group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = packed_rows(args.rows, args.seq_length, args.vocab, np.random.default_rng(0))
    n = args.seq_length // 4
    scorer = OnlineScorer(LongContextConfig(method="dense", short_context=n, stride=3 * n // 4),
                          seq_length=args.seq_length)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        logits = row_logits(model, batch)  # [L, b, v]
        loss = weighted_cross_entropy(logits, batch["labels"].t(), batch["loss_weights"].t())
        (loss.sum() / batch["loss_weights"].sum()).backward()
        optimizer.step()

    def score_step():
        scorer.weights(model, batch)

    timings = {"train_step": [], "scorer": []}
    for repeat in range(args.warmup + args.repeats):
        for name, fn in (("train_step", train_step), ("scorer", score_step)):
            t0 = time.perf_counter()
            fn()
            if repeat >= args.warmup:
                timings[name].append(time.perf_counter() - t0)
    short_tokens = scorer.score(model, batch).short_tokens
    best = {name: min(values) for name, values in timings.items()}
    tokens = args.rows * args.seq_length
    return {
        "rows": args.rows, "seq_length": args.seq_length, "short_context": n, "stride": 3 * n // 4,
        "train_step_s": best["train_step"], "scorer_s": best["scorer"],
        "scorer_over_train_step": best["scorer"] / best["train_step"],
        "short_window_tokens_per_row_token": short_tokens / tokens,
        "all_timings_s": timings,
    }


def bench_offline(args, group, workdir):
    from megatron_tokweight.data.prepare import prepare_jsonl
    from megatron_tokweight.longcontext.scorer_offline import score_dataset
    from megatron_tokweight.model.gpt import ModelConfig, build_gpt_model

    rng = np.random.default_rng(1)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz ,.ABCDEFGHIJ0123456789"))
    jsonl = os.path.join(workdir, "texts.jsonl")
    with open(jsonl, "w") as f:
        for _ in range(args.samples):
            length = int(np.clip(rng.lognormal(np.log(args.seq_length / 2), 0.8), 8, 3 * args.seq_length))
            f.write(json.dumps({"text": "".join(rng.choice(alphabet, length))}) + "\n")
    prefix = os.path.join(workdir, "texts")
    report = prepare_jsonl(jsonl, prefix)
    vocab = int(report.tokenizer["vocab_size"])
    torch.manual_seed(0)
    model = build_gpt_model(ModelConfig(vocab_size=vocab, seq_length=args.seq_length, num_layers=args.layers,
                                        hidden_size=args.hidden, num_attention_heads=args.heads),
                            tp_group=group).eval()
    n = args.seq_length // 4
    result = score_dataset(prefix, model, model_vocab_size=vocab, model_seq_length=args.seq_length,
                           short_context=n, stride=3 * n // 4, out_dir=os.path.join(workdir, "scores"),
                           progress=False)
    return {
        "samples": result.num_samples, "tokens": result.num_tokens, "seconds": result.seconds,
        "tokens_per_s": result.tokens_per_second,
        "model_tokens_per_dataset_token": result.forward_tokens / result.num_tokens,
        "short_context": n, "stride": 3 * n // 4, "seq_length": args.seq_length,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per micro-batch")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=200, help="samples of the offline dataset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="bench-longcontext-") as workdir:
        dist.init_process_group("gloo", rank=0, world_size=1,
                                store=dist.FileStore(os.path.join(workdir, "store"), 1))
        try:
            group = dist.new_group([0])
            online = bench_online(args, group)
            offline = bench_offline(args, group, workdir)
        finally:
            dist.destroy_process_group()
    results = {"device": "cpu", "threads": torch.get_num_threads(), "hidden": args.hidden,
               "layers": args.layers, "online": online, "offline": offline}
    print(f"unfrozen scorer: {online['scorer_s'] * 1e3:.1f} ms vs training step {online['train_step_s'] * 1e3:.1f} ms "
          f"-> {online['scorer_over_train_step']:.2f}x per micro-batch of {args.rows} x {args.seq_length} "
          f"(short windows: {online['short_window_tokens_per_row_token']:.2f} tokens per row token)")
    print(f"offline scorer: {offline['tokens_per_s']:,.0f} tokens/s over {offline['tokens']:,} tokens "
          f"({offline['model_tokens_per_dataset_token']:.2f} model tokens per dataset token)")
    out = REPO / "benchmarks" / "results" / "bench_longcontext.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
