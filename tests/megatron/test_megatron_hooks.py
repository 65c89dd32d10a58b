"""Megatron-LM integration: arguments, TP broadcast, THD flattening, CP slicing, the global-batch
prefetcher and the forward_step / loss_func hooks.

References are independent: plain Python loops for the CP partition, the rows themselves for the
flattening, one process with torch.nn.functional.cross_entropy for the loss.
"""
import argparse
import py_compile
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from megatron_tokweight.data.thd_batch import (
    flatten_rows,
    slice_for_context_parallel,
    thd_partition_indices,
)
from megatron_tokweight.errors import DataFormatError
from megatron_tokweight.megatron.batch import broadcast_batch, get_batch

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers


def reference_partition(cu_padded, cp_size, cp_rank):
    """Plain-Python CP partition: per segment, chunks cp_rank and 2*cp_size-1-cp_rank."""
    out = []
    for start, end in zip(cu_padded[:-1], cu_padded[1:]):
        chunk = (end - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            out.extend(range(start + c * chunk, start + (c + 1) * chunk))
    return out


def make_rows(seed, rows=2, seq_length=24, cp_size=1, vocab=50, extra_key=True):
    """A collated micro-batch shaped like PackedDataset rows (independent of its implementation).

    Pieces of random length, each padded to a multiple of 2*cp_size, then tail padding as one
    final segment.
    """
    g = torch.Generator().manual_seed(seed)
    mult = 2 * cp_size
    batch = {k: [] for k in ("tokens", "labels", "loss_mask", "loss_weights", "position_ids", "sample_ids", "task_ids",
                             "cu_seqlens", "cu_seqlens_padded", "num_segments", "max_seqlen", "num_samples")}
    sample = 0
    for _ in range(rows):
        actual, padded = [0], [0]
        tokens = torch.zeros(seq_length, dtype=torch.int64)
        labels = torch.zeros(seq_length, dtype=torch.int64)
        mask = torch.zeros(seq_length)
        weights = torch.zeros(seq_length)
        pos = torch.zeros(seq_length, dtype=torch.int64)
        sids = torch.full((seq_length,), -1, dtype=torch.int64)
        tids = torch.full((seq_length,), -1, dtype=torch.int64)
        n_samples = 0
        while True:
            length = int(torch.randint(1, 9, (1,), generator=g))
            room = -(-length // mult) * mult
            if padded[-1] + room > seq_length - mult:
                break
            s = padded[-1]
            tokens[s : s + length] = torch.randint(1, vocab, (length,), generator=g)
            labels[s : s + length - 1] = tokens[s + 1 : s + length]
            trained = torch.rand(length, generator=g) < 0.7
            trained[-1] = False
            w = float(torch.rand(1, generator=g)) * 3
            mask[s : s + length] = trained.float()
            weights[s : s + length] = trained.float() * w
            pos[s : s + length] = torch.arange(length)
            sids[s : s + length] = sample
            tids[s : s + length] = sample % 3
            sample += 1
            n_samples += 1
            actual.append(actual[-1] + length)
            padded.append(padded[-1] + room)
        tail = seq_length - padded[-1]
        pos[padded[-1] :] = torch.arange(tail)
        actual.append(actual[-1] + tail)
        padded.append(seq_length)
        n = len(padded) - 1
        fill = [-1] * (seq_length + 1 - len(padded))
        for key, value in (("tokens", tokens), ("labels", labels), ("loss_mask", mask), ("loss_weights", weights),
                           ("position_ids", pos), ("sample_ids", sids), ("task_ids", tids)):
            batch[key].append(value)
        batch["cu_seqlens"].append(torch.tensor(actual + fill, dtype=torch.int32))
        batch["cu_seqlens_padded"].append(torch.tensor(padded + fill, dtype=torch.int32))
        batch["num_segments"].append(torch.tensor(n))
        batch["max_seqlen"].append(torch.tensor(max(b - a for a, b in zip(padded[:-1], padded[1:]))))
        batch["num_samples"].append(torch.tensor(n_samples))
    out = {k: torch.stack(v) for k, v in batch.items()}
    if extra_key:
        out["dataset_id"] = torch.tensor([seed % 2] * rows, dtype=torch.int16)
    return out


# ----------------------------------------------------------------------------- CP partition


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_partition_matches_reference_and_balances_every_sample(cp_size):
    g = torch.Generator().manual_seed(cp_size)
    lengths = (torch.randint(0, 5, (9,), generator=g) * 2 * cp_size).tolist()  # zero-length segments too
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    total = cu[-1]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    kept = []
    for rank in range(cp_size):
        idx = thd_partition_indices(cu_t, total, cp_size, rank)
        assert idx.dtype == torch.int64
        assert idx.tolist() == reference_partition(cu, cp_size, rank)
        kept.append(idx)
        # per sample: the same number of tokens and the same causal work (sum of positions + 1)
        for start, end in zip(cu[:-1], cu[1:]):
            mine = idx[(idx >= start) & (idx < end)] - start
            assert len(mine) == (end - start) // cp_size
            chunk = (end - start) // (2 * cp_size)
            expected_work = chunk * chunk * (2 * cp_size - 1) + chunk * (chunk + 1)
            assert int((mine + 1).sum()) == expected_work
    # the CP slices partition the stream
    assert sorted(torch.cat(kept).tolist()) == list(range(total))


def test_partition_rejects_segments_not_divisible_by_2cp():
    with pytest.raises(DataFormatError, match="multiple of 4"):
        thd_partition_indices(torch.tensor([0, 4, 10, 12]), 12, 2, 0)
    with pytest.raises(DataFormatError, match="run from 0 to 16"):
        thd_partition_indices(torch.tensor([0, 4, 12]), 16, 2, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        thd_partition_indices(torch.tensor([0, 4]), 4, 2, 2)


# ----------------------------------------------------------------------------- flattening


def test_flatten_rows_concatenates_rows_and_boundaries():
    rows = make_rows(seed=3, rows=3, seq_length=24, cp_size=2)
    flat = flatten_rows(rows)
    assert set(flat) == set(rows)  # no key dropped
    assert torch.equal(flat["tokens"], rows["tokens"].reshape(1, -1))
    assert torch.equal(flat["loss_weights"], rows["loss_weights"].reshape(1, -1))
    assert torch.equal(flat["num_samples"], rows["num_samples"])
    # a row's dataset_id labels each of its tokens (it survives CP slicing that way)
    assert torch.equal(flat["dataset_id"], rows["dataset_id"].repeat_interleave(24).reshape(1, -1))
    # boundaries: each row's segment lengths, in row order
    for key in ("cu_seqlens", "cu_seqlens_padded"):
        lengths = []
        for r in range(3):
            n = int(rows["num_segments"][r])
            cu = rows[key][r, : n + 1].tolist()
            lengths += [b - a for a, b in zip(cu[:-1], cu[1:])]
        got = flat[key].tolist()
        assert flat[key].dtype == torch.int32 and got[0] == 0
        assert [b - a for a, b in zip(got[:-1], got[1:])] == lengths
    assert int(flat["cu_seqlens_padded"][-1]) == 72
    assert int(flat["num_segments"]) == int(rows["num_segments"].sum())
    assert int(flat["max_seqlen"]) == int(rows["max_seqlen"].max())


def test_flatten_rows_reports_bad_rows():
    rows = make_rows(seed=1)
    bad = dict(rows, cu_seqlens_padded=rows["cu_seqlens_padded"].clone())
    n = int(bad["num_segments"][1])
    bad["cu_seqlens_padded"][1, n] = 20
    with pytest.raises(DataFormatError, match="cover every row position"):
        flatten_rows(bad)
    with pytest.raises(DataFormatError, match="no 'cu_seqlens'"):
        flatten_rows({k: v for k, v in rows.items() if k != "cu_seqlens"})


def test_cp_slices_reconstruct_the_stream():
    cp_size = 2
    flat = flatten_rows(make_rows(seed=5, rows=2, seq_length=32, cp_size=cp_size))
    total = flat["tokens"].shape[1]
    rebuilt = {k: torch.full_like(flat[k], -7) for k in ("tokens", "loss_weights", "position_ids")}
    for rank in range(cp_size):
        part = slice_for_context_parallel(flat, cp_size, rank, use_te=False)
        idx = torch.tensor(reference_partition(flat["cu_seqlens_padded"].tolist(), cp_size, rank))
        for key in rebuilt:
            assert part[key].shape == (1, total // cp_size)
            rebuilt[key][0, idx] = part[key][0]
        # whole-stream descriptions are kept whole
        assert torch.equal(part["cu_seqlens"], flat["cu_seqlens"])
        assert torch.equal(part["num_samples"], flat["num_samples"])
    for key in rebuilt:
        assert torch.equal(rebuilt[key], flat[key])


def test_get_batch_single_rank_returns_thd_params():
    rows = make_rows(seed=2)
    batch, params = get_batch(iter([rows]), device="cpu")
    assert params.qkv_format == "thd"
    assert torch.equal(params.cu_seqlens_q, batch["cu_seqlens"])
    assert torch.equal(params.cu_seqlens_kv_padded, batch["cu_seqlens_padded"])
    assert params.max_seqlen_q == int(rows["max_seqlen"].max())
    assert torch.equal(batch["labels"], rows["labels"].reshape(1, -1))
    with pytest.raises(DataFormatError, match="dict of tensors"):
        get_batch(iter([[1, 2]]), device="cpu")
    with pytest.raises(DataFormatError, match="'tokens'"):
        broadcast_batch({"tokens": [1, 2]}, None, "cpu")


# ----------------------------------------------------------------------------- arguments, datasets

# the Megatron-LM arguments the datasets provider reads (names and types as Megatron-LM defines them)
MEGATRON_FLAGS = (
    ("--data-path", dict(nargs="*", default=None)),
    ("--split", dict(default=None)),
    ("--seq-length", dict(type=int, required=True)),
    ("--seed", dict(type=int, default=1234)),
    ("--data-cache-path", dict(default=None)),
    ("--context-parallel-size", dict(type=int, default=1)),
    ("--micro-batch-size", dict(type=int, default=1)),
    ("--pipeline-model-parallel-size", dict(type=int, default=1)),
    ("--calculate-per-token-loss", dict(action="store_true")),
    ("--check-for-nan-in-loss-and-grad", dict(action="store_true")),
)


def megatron_args(argv):
    from megatron_tokweight.megatron.arguments import extra_args_provider

    parser = argparse.ArgumentParser()
    for flag, kwargs in MEGATRON_FLAGS:
        parser.add_argument(flag, **kwargs)
    assert extra_args_provider(parser) is parser
    return parser.parse_args(argv)


def write_prefixes(directory, prepared_prefix):
    """Two prepared prefixes: captions and answers, of varied lengths (byte tokenizer)."""
    return [prepared_prefix(directory, name, [{"prompt": "q" * (1 + i % 5), "response": "a" * (1 + (7 * i) % 19),
                                               "task": task} for i in range(40)])
            for name, task in (("captions", "caption"), ("answers", "qa"))]


def test_args_round_trip_into_the_dataset_config(tmp_path, prepared_prefix):
    from megatron_tokweight.data.packed_dataset import build_packed_datasets
    from megatron_tokweight.megatron.arguments import weighting_config_from_args
    from megatron_tokweight.megatron.datasets_provider import (
        packed_dataset_config_from_args,
        report_names,
    )
    from megatron_tokweight.weighting import WeightingConfig

    prefixes = write_prefixes(tmp_path, prepared_prefix)
    argv = ["--data-path", "30", prefixes[0], "70", prefixes[1], "--split", "90,10,0", "--seq-length", "40",
            "--seed", "7", "--data-cache-path", str(tmp_path / "cache"), "--context-parallel-size", "2",
            "--token-weighting-preset", "molmo2", "--token-weighting-task-rule", "qa=power:3:0.5",
            "--loss-normalization", "sample_count", "--pack-algorithm", "ffd", "--pack-overlong", "split"]
    args = megatron_args(argv)
    config = packed_dataset_config_from_args(args)
    assert config.blend == (prefixes, [30.0, 70.0]) and config.split == "90,10,0"
    assert (config.sequence_length, config.random_seed, config.context_parallel_size) == (40, 7, 2)
    assert (config.pack_algorithm, config.overlong, config.path_to_cache) == ("ffd", "split", str(tmp_path / "cache"))
    expected = WeightingConfig(preset="molmo2", task_rules=["qa=power:3:0.5"], normalization="sample_count")
    assert config.weighting == expected
    # the config's weighting written back as flags parses to the same config
    again = megatron_args(["--seq-length", "40", "--data-path", prefixes[0], "--token-weighting-preset", "molmo2",
                           *sum((["--token-weighting-task-rule", r] for r in config.weighting.to_dict()["task_rules"]), []),
                           "--loss-normalization", config.weighting.normalization])
    assert weighting_config_from_args(again) == config.weighting
    # unset packing flags keep PackedDatasetConfig's defaults
    plain = packed_dataset_config_from_args(megatron_args(["--seq-length", "40", "--data-path", prefixes[1]]))
    assert (plain.pack_algorithm, plain.overlong, plain.split) == ("bfd", "truncate", "969, 30, 1")
    with pytest.raises(SystemExit):
        megatron_args(["--seq-length", "40", "--pack-algorithm", "worst-fit"])
    assert megatron_args(["--seq-length", "40"]).loss_report == "full"
    assert megatron_args(["--seq-length", "40", "--loss-report", "objective"]).loss_report == "objective"
    with pytest.raises(SystemExit):
        megatron_args(["--seq-length", "40", "--loss-report", "tasks"])

    # the builder gives a blend of packed rows, CP-padded, with dataset ids; report names follow
    # (no --data-cache-path here: Megatron's BlendedDataset cache needs torch.distributed)
    cache_flag = argv.index("--data-cache-path")
    config = packed_dataset_config_from_args(megatron_args(argv[:cache_flag] + argv[cache_flag + 2 :]))
    train, valid, test = build_packed_datasets(config, [12, 4, 0])
    assert len(train) >= 12 and len(valid) >= 4  # a blend rounds sizes up
    row = train[0]
    assert {"tokens", "loss_weights", "cu_seqlens_padded", "num_samples", "dataset_id"} <= set(row)
    n = int(row["num_segments"])
    assert all(int(d) % 4 == 0 for d in torch.diff(row["cu_seqlens_padded"][: n + 1].long()))
    # real rows (CP-padded, a blend) flatten and CP-slice into a partition of the stream
    flat = flatten_rows(default_collate([train[i] for i in range(4)]))
    assert flat["dataset_id"].shape == flat["tokens"].shape == (1, 160)
    parts = [slice_for_context_parallel(flat, 2, rank, use_te=False) for rank in range(2)]
    assert sorted(torch.cat([p["loss_weights"][0] for p in parts]).tolist()) == sorted(flat["loss_weights"][0].tolist())
    assert sum(int((p["loss_mask"] != 0).sum()) for p in parts) == int((flat["loss_mask"] != 0).sum())
    # the prefixes list different tasks (task ids index each prefix's own list): no per-task report
    assert report_names(config) == ((), ("captions", "answers"))
    assert report_names(plain) == (("qa",), ())


@pytest.mark.parametrize("argv, message", [
    (["--pipeline-model-parallel-size", "2", "--long-context-scorer", "unfrozen"],
     "--long-context-scorer unfrozen .* use --pipeline-model-parallel-size 1 \\(got 2\\)"),
    (["--pipeline-model-parallel-size", "2", "--long-context-method", "rho1"], "got 2\\), or the frozen scorer"),
    (["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2"], "use --micro-batch-size 1"),
])
def test_flag_combinations_refused_while_parsing(capsys, argv, message):
    """Before any rank builds a model: argparse's own refusal (usage, message, exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        megatron_args(["--seq-length", "64", *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    megatron_args(["--seq-length", "64", "--pipeline-model-parallel-size", "2",
                   "--long-context-scorer", "frozen"])  # the frozen scorer works with pipelines


def test_vocab_check_names_the_flag_to_use(tmp_path, prepared_prefix):
    from megatron_tokweight.data.sidecar import read_sidecar
    from megatron_tokweight.errors import ConfigError
    from megatron_tokweight.megatron.datasets_provider import check_vocab_size

    prefix = write_prefixes(tmp_path, prepared_prefix)[0]
    vocab = read_sidecar(prefix).tokenizer["vocab_size"]
    args = megatron_args(["--seq-length", "32", "--data-path", prefix])
    args.padded_vocab_size = vocab
    check_vocab_size(args)
    args.padded_vocab_size = vocab - 1
    with pytest.raises(ConfigError, match=f"--vocab-size {vocab}"):
        check_vocab_size(args)


def test_example_script_compiles_without_megatron_lm():
    import importlib.util

    script = REPO / "examples" / "pretrain_gpt_tokweight.py"
    py_compile.compile(str(script), doraise=True)
    # importing it (not running main) needs no Megatron-LM
    spec = importlib.util.spec_from_file_location("pretrain_gpt_tokweight", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main) and callable(module.model_provider)
    if importlib.util.find_spec("megatron.training") is None:
        with pytest.raises(ImportError, match="megatron.training"):
            module.main()  # main() is where Megatron-LM is imported



_RUN_EXAMPLE_MAIN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("script", sys.argv[1])
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
module._python311_compat()
import megatron.training as training
calls = []
training.pretrain = lambda cfg, *hooks, model_provider=None: calls.append((cfg, hooks, model_provider))
sys.argv = ["pretrain_gpt_tokweight.py"] + sys.argv[2:]
assert module.main() == 0
from megatron.training import get_args
from megatron_tokweight.megatron import forward_step, train_valid_test_datasets_provider
cfg, hooks, provider = calls[0]
args = get_args()
print(type(cfg).__name__, hooks[0] is train_valid_test_datasets_provider, hooks[2] is forward_step,
      provider is module.model_provider, args.token_weighting_preset, args.pack_overlong, args.tokenizer_type)
"""


def test_example_script_takes_the_019_pretrain_api(tmp_path):
    """megatron-core 0.19: arguments parsed and validated with the plugin's flags, then
    `pretrain(config_container, datasets_provider, model_type, forward_step, model_provider=...)`
    (`pretrain` itself replaced: the training run is not what this checks)."""
    import importlib.util
    import inspect
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("megatron.training") is None:
        pytest.skip("megatron.training is not installed (megatron-core < 0.19 ships without it)")
    spec = importlib.util.spec_from_file_location("pretrain_gpt_tokweight", REPO / "examples" / "pretrain_gpt_tokweight.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example._python311_compat()  # megatron.training of 0.19 on Python 3.11
    import megatron.training

    if "extra_args_provider" in inspect.signature(megatron.training.pretrain).parameters:
        pytest.skip("this megatron.training has the pre-0.19 pretrain signature")
    script = tmp_path / "run_main.py"
    script.write_text(_RUN_EXAMPLE_MAIN)
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--train-iters", "1", "--lr", "1e-3", "--data-path", str(tmp_path / "unused"), "--split", "1,0,0",
            "--vocab-size", "262", "--token-weighting-preset", "molmo2", "--pack-overlong", "split",
            "--transformer-impl", "local"]
    proc = subprocess.run([sys.executable, str(script), str(REPO / "examples" / "pretrain_gpt_tokweight.py"), *argv],
                          capture_output=True, text=True, env=dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-7:] == ["PretrainConfigContainer", "True", "True", "True", "molmo2", "split",
                                        "NullTokenizer"]

# ----------------------------------------------------------------------------- one spawn, 2 ranks
#
# Importing torch + Megatron-Core dominates a spawn's cost, so one 2-rank spawn runs every
# distributed case in turn: TP broadcast (TP=2), CP slicing (CP=2), the prefetcher over DP=2 and
# over CP=2, and forward_step through the schedule under TP=2 and under DP=2.


class CountingIterator:
    """An iterator that counts how many items were pulled from it."""

    def __init__(self, items):
        self.items, self.pulled = list(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.pulled == len(self.items):
            raise StopIteration
        self.pulled += 1
        return self.items[self.pulled - 1]


def broadcast_rows():
    rows = make_rows(seed=11, rows=2, seq_length=32, cp_size=2)
    rows["custom_float64"] = torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7
    rows["custom_bool"] = torch.tensor([True, False])
    return rows


def prefetch_rows(reader, step, m):
    """Rows read by data reader `reader` (a DP rank; CP ranks of one replica read the same rows)."""
    return make_rows(seed=100 + 10 * step + 4 * reader + m, rows=2, seq_length=24, cp_size=2)


GLOBAL_ROWS, MBS, M = 8, 2, 2
PREFETCH_LAYOUTS = ("dp", "cp")  # the 2 ranks as DP=2 (different rows) or as CP=2 (same rows)
FORWARD_LAYOUTS = (2, 1)  # tensor-parallel size; DP = 2 / TP
COMBOS = (  # (calculate_per_token_loss, normalization, path)
    (False, "weight_sum", "args"),  # TokweightSteps from Megatron-LM args + parallel state, loss in the model
    (True, "weight_sum", "args"),
    (False, "sample_count", "args"),
    (True, "token_count", "args"),
    (True, "sample_count", "explicit"),  # explicit groups, logits + the loss module's cross-entropy
    (False, "token_count", "hook"),  # the module-level forward_step as Megatron-LM calls it
    (True, "weight_sum", "objective"),  # from args with --loss-report objective: one fp32 pair, the same L
)
TRACKED = ("embedding.position_embeddings.weight", "decoder.final_layernorm.weight", "embedding.word_embeddings.weight")
# the unfrozen long-context scorer in the prefetcher (TP = 2: every TP rank reads the step)
ONLINE_COMBOS = ((False, "weight_sum"), (True, "token_count"))
# then the fused linear cross-entropy (--tokweight-fused-ce torch), last: it stays enabled on the model
FUSED_COMBOS = ((False, "sample_count", "fused"), (True, "weight_sum", "fused"), (False, "weight_sum", "fused-online"))
ALL_COMBOS = COMBOS + tuple((per_token, mode, "online") for per_token, mode in ONLINE_COMBOS) + FUSED_COMBOS
LONG_CONTEXT = {"method": "dense", "scorer": "unfrozen", "lambda": 0.5, "n": 8, "stride": 4}


def _clone(batch):
    # received tensors are views of one byte buffer: cloned so they pickle
    return {key: value.clone() for key, value in batch.items()}


def _case_tp_broadcast(rank):
    from megatron_tokweight.megatron.batch import get_batch

    it = iter([broadcast_rows()]) if rank == 0 else None
    batch, params = get_batch(it, dist.group.WORLD, None, device="cpu", use_te=False)
    return {"batch": _clone(batch), "params": (params.qkv_format, params.cu_seqlens_q, params.cu_seqlens_q_padded, params.max_seqlen_q)}


def _case_tp_rows(rank):
    """Rank 0's row batches on both TP ranks, then StopIteration on both when rank 0's run out."""
    from megatron_tokweight.megatron.batch import TensorParallelRows

    source = iter([make_rows(seed=s) for s in (21, 22)]) if rank == 0 else None
    rows = TensorParallelRows(source, dist.group.WORLD, device="cpu")
    received = [_clone(next(rows)) for _ in range(2)]
    with pytest.raises(StopIteration):
        next(rows)
    return received


def _case_cp(rank):
    from megatron_tokweight.megatron.batch import get_batch

    batch, _ = get_batch(iter([broadcast_rows()]), None, dist.group.WORLD, device="cpu", use_te=False)
    return _clone(batch)


def _case_prefetcher(rank, layout):
    from megatron_tokweight.megatron.prefetch import (
        STATS_KEY,
        GlobalBatchPrefetcher,
        decode_stats,
    )

    reader, cp_size, cp_rank = (rank, 1, 0) if layout == "dp" else (0, 2, rank)
    source = CountingIterator([prefetch_rows(reader, step, m) for step in range(2) for m in range(M)])
    prefetcher = GlobalBatchPrefetcher(source, lambda: M, dist.group.WORLD, cp_size=cp_size, cp_rank=cp_rank,
                                       num_tasks=3, num_datasets=2)
    out = {"pulled": [], "batches": [], "stats": [], "carried": []}
    for _ in range(2 * M):
        batch = next(prefetcher)
        out["pulled"].append(source.pulled)
        out["carried"].append(decode_stats(batch.pop(STATS_KEY), 3, 2))
        out["batches"].append(batch)
        if len(out["batches"]) % M == 0:
            out["stats"].append(prefetcher.last_stats)
    with pytest.raises(StopIteration):
        next(prefetcher)
    return out


def _megatron_batches(dataset, dp_rank, dp_size):
    """This DP rank's micro-batches of the first global batch, laid out as Megatron's sampler does."""
    rows_per_rank = GLOBAL_ROWS // dp_size
    return [default_collate([dataset[m * MBS * dp_size + dp_rank * MBS + i] for i in range(MBS)])
            for m in range(rows_per_rank // MBS)]


def _reference(train, model_config, rank):
    """Loss and tracked gradients of one process computing sum w*l / Z over the global batch;
    under "online" the same with w times the dense long-context weights of the model itself
    (plain references of tests/test_longcontext_train.py: every piece and window run alone)."""
    from reference_longcontext import plain_dense, plain_logprobs

    from megatron_tokweight.model.gpt import ModelConfig, build_gpt_model, row_logits

    torch.manual_seed(5)
    model = build_gpt_model(ModelConfig(**model_config), tp_group=dist.new_group([rank], use_local_synchronization=True))
    rows = default_collate([train[i] for i in range(GLOBAL_ROWS)])
    logits = row_logits(model, rows).float()  # [L, b, V]
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), rows["labels"].t().reshape(-1), reduction="none"
    ).reshape(logits.shape[:2]).t()
    short, long = plain_logprobs(model, rows, n=LONG_CONTEXT["n"], stride=LONG_CONTEXT["stride"])
    online = rows["loss_weights"] * plain_dense(short, long, rows, LONG_CONTEXT["lambda"]).float()
    params = dict(model.named_parameters())
    tokens = float((rows["loss_mask"] != 0).sum())
    reference = {"unweighted": float((per_token * rows["loss_mask"]).sum() / tokens), "online": {}}
    for weights, out in ((rows["loss_weights"], reference), (online, reference["online"])):
        weighted = (per_token * weights).sum()
        z = {"weight_sum": weights.double().sum().item(), "token_count": tokens,
             "sample_count": float(rows["num_samples"].sum())}
        for mode, value in z.items():
            model.zero_grad()
            loss = weighted / value
            loss.backward(retain_graph=True)
            out[mode] = {"loss": float(loss), **{name: params[name].grad.clone() for name in TRACKED}}
    return reference


def _hook_with_args(args):
    """`steps.forward_step` reading `args` through a stand-in `megatron.training.get_args`
    (Megatron-LM is not installed here; the hook imports only `get_args` from it)."""
    import sys
    import types

    from megatron_tokweight.megatron import steps

    stand_in = types.ModuleType("megatron.training")
    stand_in.get_args = lambda: args
    sys.modules["megatron.training"] = stand_in
    steps._HOOKS = None  # built from these args at the next call
    return steps.forward_step


def _case_forward_step(rank, prefix, cache):
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    from megatron_tokweight.data.packed_dataset import build_packed_datasets
    from megatron_tokweight.data.sidecar import read_sidecar
    from megatron_tokweight.longcontext import LongContextConfig
    from megatron_tokweight.longcontext.scorer_online import step_scorer
    from megatron_tokweight.loss import reduce_reports
    from megatron_tokweight.megatron.datasets_provider import (
        packed_dataset_config_from_args,
    )
    from megatron_tokweight.megatron.steps import (
        TokweightSteps,
        steps_from_megatron_args,
    )
    from megatron_tokweight.model.gpt import ModelConfig, build_gpt_model
    from megatron_tokweight.trainer.forward_backward import (
        ScheduleConfig,
        forward_backward,
    )

    argv = ["--data-path", prefix, "--split", "1,0,0", "--seq-length", "32", "--seed", "3", "--data-cache-path", cache,
            "--micro-batch-size", str(MBS), "--token-weighting-preset", "molmo2"]
    train, _, _ = build_packed_datasets(packed_dataset_config_from_args(megatron_args(argv)), [GLOBAL_ROWS, 0, 0])
    model_config = dict(vocab_size=read_sidecar(prefix).tokenizer["vocab_size"], seq_length=32, num_layers=2,
                        hidden_size=32, num_attention_heads=4)
    out = {"reference": _reference(train, model_config, rank), "layouts": []}
    for tp_size in FORWARD_LAYOUTS:
        dp_size = 2 // tp_size
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
        init_num_microbatches_calculator(rank, None, GLOBAL_ROWS, MBS, dp_size)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        tp_rank, dp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank()
        torch.manual_seed(5)
        model = build_gpt_model(ModelConfig(**model_config, tensor_model_parallel_size=tp_size), tp_group=tp_group)
        named = dict(model.named_parameters())
        m = GLOBAL_ROWS // (MBS * dp_size)
        results = []
        for per_token_loss, normalization, path in ALL_COMBOS:
            args = megatron_args(argv + ["--loss-normalization", normalization, "--check-for-nan-in-loss-and-grad"]
                                 + (["--calculate-per-token-loss"] if per_token_loss else [])
                                 + (["--loss-report", "objective"] if path == "objective" else [])
                                 + (["--tokweight-fused-ce", "torch"] if path == "fused" else []))
            if path in ("args", "objective", "fused"):
                forward_step = steps_from_megatron_args(args).forward_step
            elif path == "explicit":
                forward_step = TokweightSteps(normalization, per_token_loss, m, tp_group, None, dp_group, device="cpu",
                                              loss_in_model=False).forward_step
            elif path in ("online", "fused-online"):
                scorer = step_scorer(LongContextConfig.from_dict(LONG_CONTEXT), tp_group, 32)
                fused = "torch" if path == "fused-online" else "off"
                forward_step = TokweightSteps(normalization, per_token_loss, m, tp_group, None, dp_group, device="cpu",
                                              long_context_scorer=scorer, fused_cross_entropy=fused).forward_step
            else:
                forward_step = _hook_with_args(args)
            data = iter(_megatron_batches(train, dp_rank, dp_size)) if tp_rank == 0 else None
            model.zero_grad()
            reports, _ = forward_backward(forward_step, data, model, m, ScheduleConfig(per_token_loss), dp_group)
            reduced = reduce_reports(reports, dp_group)
            results.append({"loss": reduced["weighted loss"], "lm loss": reduced.get("lm loss"), "keys": sorted(reduced),
                            **{name: named[name].grad.clone() for name in TRACKED}})
        out["layouts"].append({"tp_size": tp_size, "tp_rank": tp_rank, "results": results})
        destroy_num_microbatches_calculator()
        parallel_state.destroy_model_parallel()
    return out


def _hooks_rank(rank, world_size, prefix, cache):
    return {
        "broadcast": _case_tp_broadcast(rank),
        "tp_rows": _case_tp_rows(rank),
        "cp": _case_cp(rank),
        "prefetch": {layout: _case_prefetcher(rank, layout) for layout in PREFETCH_LAYOUTS},
        "forward": _case_forward_step(rank, prefix, cache),
    }


def reference_stats(rows_list, num_tasks, num_datasets):
    """The global batch's totals counted token by token over whole rows."""
    weight = sum(r["loss_weights"].double().sum().item() for r in rows_list)
    tokens = sum(int((r["loss_mask"] != 0).sum()) for r in rows_list)
    samples = sum(int(r["num_samples"].sum()) for r in rows_list)
    task_tokens, task_weight = [0] * num_tasks, [0.0] * num_tasks
    data_tokens, data_weight = [0] * num_datasets, [0.0] * num_datasets
    for r in rows_list:
        for row in range(r["tokens"].shape[0]):
            for t in range(r["tokens"].shape[1]):
                if r["loss_mask"][row, t] != 0:
                    task, data, w = int(r["task_ids"][row, t]), int(r["dataset_id"][row]), float(r["loss_weights"][row, t])
                    task_tokens[task] += 1
                    task_weight[task] += w
                    data_tokens[data] += 1
                    data_weight[data] += w
    return weight, tokens, samples, task_tokens, task_weight, data_tokens, data_weight


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, prepared_prefix):
    """Every case below, run once on two gloo ranks (one spawn for the module)."""
    from megatron_tokweight.trainer.spawn import spawn

    root = tmp_path_factory.mktemp("hooks")
    prefix = write_prefixes(root, prepared_prefix)[1]
    return spawn(_hooks_rank, 2, prefix, str(root / "cache"))


@pytest.mark.distributed
def test_tp_broadcast_delivers_every_key(two_ranks):
    """TP broadcast: both TP ranks hold rank 0's batch, every key, same dtypes and values."""
    results = two_ranks
    flat = flatten_rows(broadcast_rows())
    for rank in range(2):
        got = results[rank]["broadcast"]["batch"]
        assert list(got) == list(flat)
        for key in flat:
            assert got[key].dtype == flat[key].dtype and torch.equal(got[key], flat[key]), key
        fmt, cu, cu_padded, max_seqlen = results[rank]["broadcast"]["params"]
        assert fmt == "thd" and torch.equal(cu, flat["cu_seqlens"]) and torch.equal(cu_padded, flat["cu_seqlens_padded"])
        assert max_seqlen == int(flat["max_seqlen"])


@pytest.mark.distributed
def test_every_tp_rank_reads_rank0s_rows(two_ranks):
    """Every TP rank reads the step (online long-context scoring): rank 0's rows, then the end."""
    results = two_ranks
    for rank in range(2):
        for got, seed in zip(results[rank]["tp_rows"], (21, 22)):
            want = make_rows(seed=seed)
            assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.distributed
def test_cp_rank_keeps_the_reference_partition(two_ranks):
    """CP: each rank keeps the reference partition of every per-token key, the rest whole."""
    results = two_ranks
    flat = flatten_rows(broadcast_rows())
    total = flat["tokens"].shape[1]
    for rank in range(2):
        got = results[rank]["cp"]
        index = torch.tensor(reference_partition(flat["cu_seqlens_padded"].tolist(), 2, rank))
        for key, value in flat.items():
            want = value[:, index] if value.shape == (1, total) else value
            assert torch.equal(got[key], want), key


@pytest.mark.distributed
def test_prefetcher_replays_the_step_and_counts_z(two_ranks):
    """Prefetcher: reads a whole step at its first pull, replays it exactly, Z = direct count."""
    results = two_ranks
    for layout in PREFETCH_LAYOUTS:
        readers = (0, 1) if layout == "dp" else (0,)
        for rank in range(2):
            out = results[rank]["prefetch"][layout]
            assert out["pulled"] == [M] * M + [2 * M] * M
            reader = rank if layout == "dp" else 0
            expected = [flatten_rows(prefetch_rows(reader, step, m)) for step in range(2) for m in range(M)]
            for got, want in zip(out["batches"], expected):
                assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
            for step in range(2):
                weight, tokens, samples, tt, tw, dt, dw = reference_stats(
                    [prefetch_rows(r, step, m) for r in readers for m in range(M)], 3, 2)
                stats = out["stats"][step]
                assert stats.weight_sum == pytest.approx(weight, rel=1e-12), layout
                assert (stats.loss_tokens, stats.num_samples) == (tokens, samples), layout
                assert list(stats.task_loss_tokens) == tt and list(stats.dataset_loss_tokens) == dt
                assert list(stats.task_weight_sum) == pytest.approx(tw) and list(stats.dataset_weight_sum) == pytest.approx(dw)
                for carried, carried_m in out["carried"][step * M : (step + 1) * M]:
                    assert carried == stats and carried_m == M


@pytest.mark.distributed
def test_forward_step_equals_the_one_process_reference(two_ranks):
    """Forward_step / loss_func through the schedule protocol == the one-process reference."""
    results = two_ranks
    for rank in range(2):
        reference = results[rank]["forward"]["reference"]
        # the weighting matters here: the three objectives differ, and long-context weights change them
        losses = [reference[mode]["loss"] for mode in ("weight_sum", "sample_count", "token_count")]
        assert min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1 :]) > 1e-3 * max(losses)
        for mode in ("weight_sum", "token_count"):
            assert abs(reference["online"][mode]["loss"] - reference[mode]["loss"]) > 1e-4 * reference[mode]["loss"]
        for layout in results[rank]["forward"]["layouts"]:
            tp_size, tp_rank = layout["tp_size"], layout["tp_rank"]
            assert len(layout["results"]) == len(ALL_COMBOS)
            for (per_token_loss, mode, path), got in zip(ALL_COMBOS, layout["results"]):
                where = (tp_size, per_token_loss, mode, path)
                online = path in ("online", "fused-online")
                ref = reference["online"][mode] if online else reference[mode]
                assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), where
                if path == "objective":
                    assert got["keys"] == ["weighted loss"], where
                else:
                    assert got["lm loss"] == pytest.approx(reference["unweighted"], rel=1e-5), where
                for name in TRACKED[:2]:
                    torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{name} {where}")
                shard = got[TRACKED[2]].shape[0]  # the vocabulary-parallel embedding: this TP rank's rows
                torch.testing.assert_close(got[TRACKED[2]], ref[TRACKED[2]][tp_rank * shard : (tp_rank + 1) * shard],
                                           rtol=1e-4, atol=1e-6, msg=f"word embeddings {where}")
