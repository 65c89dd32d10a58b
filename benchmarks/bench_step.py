"""Benchmark: a whole training step with token weighting vs the same step on Megatron's plain path.

One process (gloo world of one, Megatron's parallel state initialised with TP = 1), one model
shape, the same packed rows (the demo corpus, prepared and packed by the real code) for both:

- `weighted`: molmo2 weights; `LossSettings.global_batch_stats` (the step's all-reduce, over a
  group of one) + `TokweightGPTModel(labels=...)` (per-token loss over the model's TP group) +
  `make_loss_func` (weights, exact-L scaling, per-task reports) - the `tokweight train` path;
- `stock`: a stock Megatron `GPTModel` (same weights) whose loss is Megatron's own
  `compute_language_model_loss` (`vocab_parallel_cross_entropy`), uniform weights through
  `stock_loss_func` (Megatron-LM's `pretrain_gpt.loss_func` semantics).

Both run M micro-batches through `megatron_tokweight.trainer.forward_backward.forward_backward` (Megatron's
`forward_step_calc_loss`, backward, gradient finalisation) and an AdamW step, with the packed
(THD) `PackedCoreAttention`. Repetitions are interleaved (the order alternates every repetition)
after warm-up; wall time and CPU time (`time.process_time`) per step; the ratio of the medians
and the median of the per-repetition ratios weighted / stock (the two steps of a repetition run
back to back, under the same load; target <= 1.03). On a shared machine the CPU time and the
paired ratio are the steadier measures.

Results: printed and written to benchmarks/results/bench_step.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_step.json"
TARGET = 1.03


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192, help="model vocabulary (>= the byte tokenizer's 262)")
    p.add_argument("--reps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def prepare_rows(work, seq_length, rows_needed):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron_tokweight.data.packed_dataset import (
        PackedDataset,
        PackedDatasetConfig,
    )
    from megatron_tokweight.data.prepare import prepare_jsonl
    from megatron_tokweight.data.sources.demo_corpus import CorpusConfig, write_corpus

    paths = write_corpus(os.path.join(work, "corpus"), CorpusConfig(num_train=400, num_eval=4))
    prefix = os.path.join(work, "train")
    prepare_jsonl(paths["train"], prefix)
    config = PackedDatasetConfig(random_seed=1, sequence_length=seq_length, blend=([prefix], None),
                                 split="100,0,0", weighting="molmo2", path_to_cache=os.path.join(work, "cache"))
    dataset = BlendedMegatronDatasetBuilder(PackedDataset, [rows_needed, None, None], lambda: True, config).build()[0]
    return dataset, list(dataset.sidecar.task_names)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from megatron_tokweight.trainer.spawn import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_tokweight.data.thd_batch import flatten_rows, packed_seq_params
    from megatron_tokweight.loss import LossSettings, stock_loss_func
    from megatron_tokweight.model.gpt import ModelConfig, build_gpt_model
    from megatron_tokweight.trainer.forward_backward import (
        ScheduleConfig,
        forward_backward,
        make_forward_step,
    )

    parallel_state.initialize_model_parallel(1)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    M = args.micro_batches
    with tempfile.TemporaryDirectory(prefix="bench-step-") as work:
        dataset, task_names = prepare_rows(work, args.seq_length, M)
        micro_batches = []
        for m in range(M):
            rows = {k: v.unsqueeze(0) for k, v in dataset[m].items()}
            batch = flatten_rows(rows)
            micro_batches.append((batch, packed_seq_params(batch)))

    config = ModelConfig(vocab_size=args.vocab_size, seq_length=args.seq_length, num_layers=args.layers,
                         hidden_size=args.hidden_size, num_attention_heads=args.heads)
    torch.manual_seed(0)
    ours = build_gpt_model(config, tp_group=tp_group)
    from megatron_tokweight.model.packed_attention import gpt_layer_spec

    stock = GPTModel(config=config.transformer_config(), transformer_layer_spec=gpt_layer_spec(False),
                     vocab_size=config.padded_vocab_size, max_sequence_length=config.seq_length,
                     parallel_output=True, share_embeddings_and_output_weights=True,
                     position_embedding_type="learned_absolute", pg_collection=ours.pg_collection)
    stock.load_state_dict(ours.state_dict())
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4)
                  for name, model in (("weighted", ours), ("stock", stock))}
    schedule = ScheduleConfig(calculate_per_token_loss=False)
    settings = LossSettings("weight_sum", M, 1, False, task_names=tuple(task_names))

    def weighted_step():
        stats = settings.global_batch_stats([b for b, _ in micro_batches], None)
        forward_backward(make_forward_step(stats, settings), iter(micro_batches), ours, M, schedule, None)
        optimizers["weighted"].step()
        optimizers["weighted"].zero_grad(set_to_none=True)

    def stock_forward_step(data_iterator, model):
        batch, params = next(data_iterator)
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                          packed_seq_params=params)  # Megatron's vocab_parallel_cross_entropy
        return per_token, partial(stock_loss_func, batch["loss_mask"])

    def stock_step():
        forward_backward(stock_forward_step, iter(micro_batches), stock, M, schedule, None)
        optimizers["stock"].step()
        optimizers["stock"].zero_grad(set_to_none=True)

    steps = {"weighted": weighted_step, "stock": stock_step}
    times = {name: {"wall": [], "cpu": []} for name in steps}
    for rep in range(args.warmup + args.reps):
        order = ("weighted", "stock") if rep % 2 == 0 else ("stock", "weighted")
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if rep >= args.warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)

    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    ratios = {k: medians["weighted"][k] / medians["stock"][k] for k in ("wall", "cpu")}
    # each repetition's two steps ran back to back under the same machine load: the median of
    # the per-repetition ratios is the least load-sensitive estimate
    paired = {k: statistics.median(w / s for w, s in zip(times["weighted"][k], times["stock"][k]))
              for k in ("wall", "cpu")}
    tokens = M * args.seq_length
    result = {
        "benchmark": "bench_step",
        "config": vars(args),
        "tokens_per_step": tokens,
        "median_seconds": medians,
        "ratio_weighted_over_stock": ratios,
        "paired_ratio_weighted_over_stock": paired,
        "target": TARGET,
        "meets_target_cpu": paired["cpu"] <= TARGET,
        "meets_target_wall": paired["wall"] <= TARGET,
        "seconds": times,
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
    }
    for name in steps:
        print(f"{name:9s} median step {medians[name]['wall'] * 1e3:8.1f} ms wall, {medians[name]['cpu'] * 1e3:8.1f} ms CPU "
              f"({tokens / medians[name]['wall']:,.0f} tok/s)")
    print(f"ratio of medians weighted / stock: wall {ratios['wall']:.3f}, CPU {ratios['cpu']:.3f}")
    print(f"median of paired ratios:          wall {paired['wall']:.3f}, CPU {paired['cpu']:.3f} "
          f"(target <= {TARGET}); load average {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
