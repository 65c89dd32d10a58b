"""JSONL -> Megatron IndexedDataset (PREFIX.bin/.idx) + sidecar (PREFIX.tokweight/).

One IndexedDataset document (one sequence) per non-blank line, tokens as uint16 when the
vocabulary fits, else int32. The input is streamed: tokens go to the .bin as each line is
encoded; only the per-sample metadata is kept. Outputs are written under temporary names and
renamed at the end, so an interrupted run leaves no half-written PREFIX.bin/.idx.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from megatron_tokweight.common.files import atomic_path
from megatron_tokweight.data.chat_template import (
    chat_spec_fields,
    resolve_chat_template,
)
from megatron_tokweight.data.content_identity import file_sha256
from megatron_tokweight.data.encode_workers import CHUNK_BYTES, EncodeJob, encoded_chunks
from megatron_tokweight.data.jsonl_shapes import JsonlFields, JsonlReader
from megatron_tokweight.data.sidecar import (
    SampleMetadata,
    sidecar_dir,
    span_targets,
    write_sidecar,
)
from megatron_tokweight.data.sidecar_builder import SampleMetadataBuilder
from megatron_tokweight.data.tokenizer import load_tokenizer
from megatron_tokweight.errors import DataFormatError


@dataclass
class TaskStats:
    samples: int
    answer_tokens: int
    median_n: float
    empty_answers: int


@dataclass
class PrepareReport:
    prefix: str
    source: str
    num_samples: int
    num_tokens: int
    token_dtype: str
    tokenizer: dict
    tasks: Dict[str, TaskStats]
    kind_tokens: Dict[str, int]  # targets per span kind
    counts: Dict[str, int]  # empty_answer, blank_lines
    seconds: float
    metadata: Optional[SampleMetadata] = field(default=None, repr=False)

    def format(self) -> str:
        tok = self.tokenizer
        lines = [
            f"prepared {self.num_samples:,} samples, {self.num_tokens:,} tokens ({self.token_dtype}, "
            f"{tok['kind']} tokenizer, vocab {tok['vocab_size']:,}) from {self.source} in {self.seconds:.2f} s",
            f"  -> {self.prefix}.bin, {self.prefix}.idx, {self.prefix}.tokweight/",
            f"  {'task':<24}{'samples':>10}{'answer tokens':>15}{'median n':>10}{'empty answers':>15}",
        ]
        for name, s in self.tasks.items():
            lines.append(f"  {name:<24}{s.samples:>10,}{s.answer_tokens:>15,}{s.median_n:>10g}{s.empty_answers:>15,}")
        lines.append("  answer tokens by span kind: " + ", ".join(f"{k} {v:,}" for k, v in self.kind_tokens.items()))
        lines.append("  counts: " + ", ".join(f"{k} {v:,}" for k, v in self.counts.items()))
        return "\n".join(lines)


def token_dtype_for(vocab_size: int) -> type:
    """Megatron's choice of .bin dtype (a numpy scalar type) for a vocabulary: uint16 below ~65.5k ids, else int32."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def check_output_prefix(prefix: str) -> None:
    """DataFormatError, before any work, when PREFIX.bin/.idx/.tokweight cannot be written as
    the dataset's files: a parent that is a file or cannot be created, an output path of the
    wrong kind (a directory where the .bin goes is never replaced)."""
    parent = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise DataFormatError(
            f"-o {prefix}: cannot create the output directory {parent}: {err.strerror or err}"
        ) from err
    if not os.path.isdir(parent):
        raise DataFormatError(f"-o {prefix}: {parent} is not a directory")
    for path, is_directory in ((prefix + ".bin", False), (prefix + ".idx", False), (sidecar_dir(prefix), True)):
        if os.path.lexists(path) and os.path.isdir(path) != is_directory:
            kind = "a directory" if os.path.isdir(path) else "a file"
            raise DataFormatError(
                f"-o {prefix}: {path} exists and is {kind}; remove it or choose another output prefix"
            )


def prepare_jsonl(
    input_path,
    prefix,
    tokenizer="byte",
    task_field: str = "task",
    default_task: str = "default",
    group_field: str = "group",
    specials: Optional[Dict[str, str]] = None,
    progress: bool = False,
    chat_template: Optional[str] = None,
    end_of_turn: Optional[str] = None,
    drop_non_text_parts: bool = False,
    workers: int = 1,
    chunk_bytes: int = CHUNK_BYTES,
) -> PrepareReport:
    """Tokenize `input_path` into PREFIX.bin/.idx and PREFIX.tokweight/; return what was written.

    Conversations render with the tokenizer directory's own chat template, or `chat_template`
    (a Jinja file, or "builtin" for the plugin's marker template; the byte tokenizer and a bare
    tokenizer.json use that one); see `data.chat_template` for what is trained. `workers` > 1
    encodes chunks of about `chunk_bytes` of input in that many processes (`data.encode_workers`);
    the files written are the same byte for byte."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    t0 = time.perf_counter()
    input_path, prefix = os.fspath(input_path), os.fspath(prefix)
    tok = load_tokenizer(tokenizer, specials=specials)
    template = resolve_chat_template(tokenizer, tok, chat_template, end_of_turn)
    fields = JsonlFields(task_field=task_field, default_task=default_task, group_field=group_field)
    dtype = token_dtype_for(tok.vocab_size)
    reader = JsonlReader(input_path)
    if not os.path.isfile(input_path):
        raise DataFormatError(f"{input_path}: input file not found")
    check_output_prefix(prefix)
    job = EncodeJob(input_path, tok, fields, template, drop_non_text_parts, dtype)

    meta = SampleMetadataBuilder()
    dropped_parts = 0
    try:
        # the sidecar is renamed into place first, then .idx, then .bin (inner blocks commit first);
        # it records both files' sha256, so a run interrupted between the renames leaves a
        # dataset that `validate_against_indexed_dataset` refuses rather than a silent mix
        with atomic_path(prefix + ".bin") as bin_tmp, atomic_path(prefix + ".idx") as idx_tmp:
            builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
            try:
                from tqdm import tqdm

                with tqdm(total=os.path.getsize(input_path), unit="B", unit_scale=True, desc="prepare",
                          disable=not progress, file=sys.stderr) as bar:
                    for chunk in encoded_chunks(reader, job, workers, chunk_bytes):
                        for tokens, task, group, spans in chunk.samples():
                            builder.add_document(tokens, [len(tokens)])
                            meta.add(len(tokens), task, group, spans)
                        dropped_parts += chunk.dropped_parts
                        bar.update(chunk.input_bytes)
                builder.finalize(idx_tmp)
            except BaseException:
                builder.data_file.close()
                raise
            spec = {**tok.spec(), **chat_spec_fields(template)}
            metadata = meta.build(spec, np.dtype(dtype).name, source=os.path.abspath(input_path))
            if metadata.num_samples == 0:
                raise DataFormatError(
                    f"{input_path}: no samples: the file is empty or all of its {reader.blank_lines} lines are "
                    "blank; nothing was written"
                )
            empty = metadata.n_answer == 0
            metadata.counts = {"empty_answer": int(empty.sum()), "blank_lines": reader.blank_lines,
                               "dropped_non_text_parts": dropped_parts}
            metadata.content = {"bin_sha256": file_sha256(bin_tmp), "idx_sha256": file_sha256(idx_tmp)}
            write_sidecar(prefix, metadata)
    except OSError as err:
        raise DataFormatError(
            f"-o {prefix}: cannot write the dataset: {err.strerror or err} ({err.filename or prefix}); "
            "choose a writable output prefix"
        ) from err

    tasks = {}
    for tid, name in enumerate(metadata.task_names):
        n = metadata.n_answer[metadata.task_id == tid]
        tasks[name] = TaskStats(int(len(n)), int(n.sum(dtype=np.int64)), float(np.median(n)), int((n == 0).sum()))
    per_kind = np.bincount(metadata.span_kind, weights=span_targets(metadata.spans), minlength=len(metadata.span_kinds))
    return PrepareReport(
        prefix=prefix,
        source=input_path,
        num_samples=metadata.num_samples,
        num_tokens=metadata.num_tokens,
        token_dtype=np.dtype(dtype).name,
        tokenizer=metadata.tokenizer,
        tasks=tasks,
        kind_tokens={k: int(v) for k, v in zip(metadata.span_kinds, per_kind)},
        counts=dict(metadata.counts),
        seconds=time.perf_counter() - t0,
        metadata=metadata,
    )
