"""Frozen scorer: a fixed GPT model scores a prepared dataset once, offline.

Every sample is cut into its training sequences (consecutive chunks of `seq_length` tokens, as
`overlong` "truncate"/"split" train them). Per chunk:
  long   one window, the chunk itself: every token sees its whole chunk prefix;
  short  strided windows of n tokens advancing by `stride` beyond the first n tokens (see
         `windows.py`): a token sees between n - stride + 1 and n tokens; the first n tokens of
         a chunk keep their long value (identical context).
Windows of many samples run together as packed THD batches of about `tokens_per_batch` tokens.
The result goes to a `score_sidecar` directory aligned with the `.bin`.
"""
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_tokweight.data.sidecar import lengths_fingerprint
from megatron_tokweight.errors import ConfigError
from megatron_tokweight.longcontext.forward import window_logprobs
from megatron_tokweight.longcontext.score_sidecar import ScoreWriter, default_scores_dir
from megatron_tokweight.longcontext.windows import check_window, plan_windows


@dataclass
class ScoreReport:
    out_dir: str
    num_samples: int
    num_tokens: int
    forward_tokens: int  # tokens run through the model (long + short windows)
    seconds: float
    counts: dict

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")


def chunk_bounds(lengths: np.ndarray, seq_length: int):
    """Flat [begin, end) of every training-sequence chunk of samples laid end to end."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    chunks = -(-lengths // seq_length)
    sample = np.repeat(np.arange(len(lengths)), chunks)
    k = np.arange(len(sample)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    begins = starts[sample] + k * seq_length
    ends = np.minimum(begins + seq_length, starts[sample] + lengths[sample])
    return begins, ends


@dataclass
class ScorerCheckpoint:
    """A `tokweight train` checkpoint seen as a frozen scorer (docs: megatron_tokweight.model.checkpoint)."""

    path: str  # the step directory
    step: int
    model_fields: dict  # ModelConfig fields except vocab_size, seq_length, TP size
    seq_length: int  # the positions the model was trained with
    tp_size: int
    train_prefixes: list
    vocab_size: Optional[int] = None  # recorded by `tokweight train` (None: an older checkpoint)
    tokenizer: Optional[dict] = None

    def rank_file(self, tp_rank: int) -> str:
        from megatron_tokweight.model.checkpoint import rank_file

        # TP groups are consecutive ranks: data-parallel replica 0 holds ranks 0..tp-1
        return os.path.join(self.path, rank_file(tp_rank))

    def model_config(self, vocab_size: int):
        from megatron_tokweight.model.gpt import ModelConfig

        return ModelConfig(vocab_size=vocab_size, seq_length=self.seq_length,
                           tensor_model_parallel_size=self.tp_size, **self.model_fields)


def open_checkpoint(path: str) -> ScorerCheckpoint:
    """A save_dir (its `latest` step) or one step directory of `tokweight train`."""
    from megatron_tokweight.model import checkpoint

    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, checkpoint.LATEST)):
        meta = checkpoint.find_latest(path)
    elif os.path.isfile(os.path.join(path, checkpoint.META)):
        meta = checkpoint.read_meta(path)
    else:
        raise ConfigError(
            f"--scorer {path}: not a `tokweight train` checkpoint (no {checkpoint.LATEST} file and no "
            f"{checkpoint.META}); pass the training save_dir or one of its step_* directories"
        )
    step_dir, step, identity = meta.path, meta.step, meta.identity
    try:
        fields = dict(identity["model"])
        seq_length = int(identity["data"]["seq_length"])
        tp_size = int(identity.get("tensor_parallel_size", 1))
        prefixes = list(identity["data"].get("prefixes") or [])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{step_dir}: checkpoint metadata lacks the model/data config ({err!r})") from None
    ckpt = ScorerCheckpoint(step_dir, step, fields, seq_length, tp_size, prefixes, meta.vocab_size, meta.tokenizer)
    for tp_rank in range(tp_size):
        if not os.path.isfile(ckpt.rank_file(tp_rank)):
            raise ConfigError(f"{ckpt.rank_file(tp_rank)} is missing: the checkpoint is incomplete")
    return ckpt


def check_scorer_matches_data(ckpt: ScorerCheckpoint, prefix: str, tokenizer: dict) -> None:
    """ConfigError when the checkpoint was trained on another vocabulary than PREFIX uses.

    The checkpoint's recorded `vocab_size` and tokenizer spec (meta.json) must equal PREFIX's (the
    tokenizer's `path` aside); a checkpoint without them is compared through its training
    prefixes' sidecars, when still readable. The embedding's padded vocabulary must match in any
    case."""
    import torch

    from megatron_tokweight.data.sidecar import read_sidecar, sidecar_dir
    from megatron_tokweight.data.tokenizer import tokenizer_differences

    fix = "prepare the data with the scorer's tokenizer, or score with a checkpoint trained on this one"
    if ckpt.vocab_size is not None and ckpt.vocab_size != tokenizer.get("vocab_size"):
        raise ConfigError(
            f"the scorer checkpoint {ckpt.path} does not match {prefix}: vocab_size: checkpoint "
            f"{ckpt.vocab_size}, data {tokenizer.get('vocab_size')}; {fix}"
        )
    if ckpt.tokenizer is not None:
        recorded = [("the checkpoint's meta.json", ckpt.tokenizer)]
    else:
        recorded = [(f"its training data {p}", read_sidecar(p).tokenizer)
                    for p in ckpt.train_prefixes if os.path.isdir(sidecar_dir(p))]
    for where, trained in recorded:
        diffs = tokenizer_differences(trained, tokenizer)
        if diffs:
            raise ConfigError(
                f"the scorer checkpoint {ckpt.path} does not match {prefix}: its tokenizer (from {where}) "
                f"differs in tokenizer.{'; tokenizer.'.join(diffs)}; {fix}"
            )
    state = torch.load(ckpt.rank_file(0), map_location="cpu", weights_only=False)["model"]
    shard = state.get("embedding.word_embeddings.weight")
    if shard is None:
        raise ConfigError(f"{ckpt.rank_file(0)}: no embedding.word_embeddings.weight in the model state")
    padded = int(shard.shape[0]) * ckpt.tp_size
    expect = ckpt.model_config(int(tokenizer["vocab_size"])).padded_vocab_size
    if padded != expect:
        raise ConfigError(
            f"the scorer {ckpt.path} has a vocabulary of {padded} (padded) but {prefix}'s tokenizer "
            f"(vocab_size {tokenizer['vocab_size']}) needs {expect}: the checkpoint belongs to another tokenizer"
        )


def load_scorer(ckpt: ScorerCheckpoint, vocab_size: int, tp_group, tp_rank: int):
    """This TP rank's shard of the checkpoint's model, in eval mode."""
    import torch

    from megatron_tokweight.model.gpt import build_gpt_model

    model = build_gpt_model(ckpt.model_config(vocab_size), tp_group=tp_group)
    state = torch.load(ckpt.rank_file(tp_rank), map_location="cpu", weights_only=False)["model"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def score_dataset(
    prefix: str,
    model,
    *,
    model_vocab_size: int,
    model_seq_length: int,
    short_context: int,
    stride: int,
    seq_length: Optional[int] = None,
    out_dir: Optional[str] = None,
    tokens_per_batch: Optional[int] = None,
    checkpoint: Optional[str] = None,
    tp_group=None,
    write: bool = True,
    progress: bool = True,
) -> ScoreReport:
    """Score PREFIX with `model` (this rank's TP shard) and write its score sidecar.

    seq_length: the training sequence length (default: the model's). Raises ConfigError when
    n >= seq_length, seq_length exceeds the model's positions, or the vocabularies differ.
    Every rank of `tp_group` runs the same windows; only ranks with `write` write.
    """
    from megatron_tokweight.data.indexed_validation import (
        read_idx_header,
        validate_against_indexed_dataset,
    )

    prefix = os.fspath(prefix)
    seq_length = model_seq_length if seq_length is None else int(seq_length)
    check_score_options(short_context, stride, seq_length, model_seq_length)
    side = validate_against_indexed_dataset(prefix, check_token_ids=True)
    data_vocab = int(side.tokenizer.get("vocab_size", -1))
    if data_vocab != model_vocab_size:
        raise ConfigError(
            f"the scorer {checkpoint or 'model'} has vocab_size {model_vocab_size} but {prefix} was "
            f"tokenized with vocab_size {data_vocab} ({side.tokenizer.get('kind')} tokenizer): "
            "score with a checkpoint trained on this tokenizer"
        )
    lengths = np.asarray(side.lengths, dtype=np.int64)
    header = read_idx_header(prefix + ".idx")
    num_tokens = int(lengths.sum())
    tokens = np.memmap(prefix + ".bin", dtype=header["dtype"], mode="r") if num_tokens else np.zeros(0, np.int64)
    budget = max(int(tokens_per_batch or 4 * seq_length), seq_length)
    out_dir = default_scores_dir(prefix) if out_dir is None else os.fspath(out_dir)
    meta = dict(
        checkpoint=checkpoint, short_context=int(short_context), stride=int(stride),
        seq_length=seq_length, vocab_size=model_vocab_size, num_samples=len(lengths),
        lengths_md5=lengths_fingerprint(lengths), first_token_value=0.0,
    )
    writer = ScoreWriter(out_dir, num_tokens, meta) if write else None
    bar = _progress_bar(num_tokens, progress and write)
    forward_tokens = 0
    start_time = time.perf_counter()
    try:
        sample_starts = np.cumsum(lengths) - lengths
        first = 0
        while first < len(lengths):
            # a group of whole samples holding about `budget` tokens
            last = int(np.searchsorted(np.cumsum(lengths[first:]), budget, side="right")) + first
            last = max(last, first + 1)
            lo = int(sample_starts[first])
            hi = int(sample_starts[last - 1] + lengths[last - 1])
            forward_tokens += _score_group(
                model, tokens[lo:hi], lengths[first:last], lo, seq_length, short_context, stride, budget,
                tp_group, writer, bar,
            )
            first = last
        seconds = time.perf_counter() - start_time
        counts = {}
        if writer is not None:
            writer.meta.update(forward_tokens=forward_tokens, seconds=round(seconds, 3))
            writer.commit()
            counts = dict(writer.counts)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return ScoreReport(out_dir, len(lengths), num_tokens, forward_tokens, seconds, counts)


def check_score_options(short_context: int, stride: int, seq_length: int, model_seq_length: int) -> None:
    check_window(short_context, stride)
    if seq_length > model_seq_length:
        raise ConfigError(
            f"--seq-length {seq_length} exceeds the scorer's {model_seq_length} learned positions"
        )
    if short_context >= seq_length:
        raise ConfigError(
            f"--short-context {short_context} must be smaller than the training sequence length "
            f"{seq_length}: short and long contexts would coincide and every score would be 0"
        )


def _score_group(model, group_tokens, lengths, offset, seq_length, n, stride, budget, tp_group, writer, bar) -> int:
    """Score samples laid end to end in `group_tokens` (they start at .bin offset `offset`)."""
    flat = torch.from_numpy(np.asarray(group_tokens, dtype=np.int64))
    total = flat.numel()
    if total == 0:
        return 0
    # position p predicts token p + 1; a sample's last position predicts nothing kept
    labels = torch.cat([flat[1:], torch.zeros(1, dtype=torch.long)])
    begins, ends = chunk_bounds(lengths, seq_length)
    long_plan = plan_windows(begins, ends, seq_length, seq_length, include_first=True)
    short_plan = plan_windows(begins, ends, n, stride, include_first=False)
    long = torch.zeros(total, dtype=torch.float32)
    window_logprobs(model, long_plan, flat, labels, long, tp_group, max_tokens=budget)
    short = long.clone()
    window_logprobs(model, short_plan, flat, labels, short, tp_group, max_tokens=budget)
    # token-aligned: token j gets the prediction made at position j - 1; chunk starts get 0
    for name, values in (("long_logprobs", long), ("short_logprobs", short)):
        if writer is None:
            break
        aligned = torch.zeros(total, dtype=torch.float32)
        aligned[1:] = values[:-1]
        aligned[torch.from_numpy(begins)] = 0.0
        writer.write(name, offset, aligned.numpy())
    if bar is not None:
        bar.update(total)  # tqdm shows the rate in tokens/s
    return long_plan.num_tokens + short_plan.num_tokens


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="scoring", dynamic_ncols=True)
