"""What packing does to a prepared dataset: `PackReport` (rows, efficiency, lossy cases, time)
and a row-fill histogram; `tokweight pack` prints it."""
import os
import time
from dataclasses import dataclass, field

import numpy as np

from megatron_tokweight.data.indexed_validation import read_idx_header
from megatron_tokweight.data.pack_index import (
    LENGTH,
    ROW,
    build_pack_index,
    trained_targets,
)
from megatron_tokweight.data.plain_prefix import sample_metadata
from megatron_tokweight.errors import ConfigError, DataFormatError


@dataclass
class PackReport:
    prefix: str
    seq_length: int
    algorithm: str
    overlong: str
    context_parallel_size: int
    rows: int
    samples: int
    real_tokens: int
    efficiency: float
    lower_bound_rows: int  # ceil(real tokens / seq_length)
    truncated: int
    split: int
    dropped: int
    empty: int
    zero_length: int
    truncated_tokens: int
    dropped_tokens: int
    answer_targets: int  # targets of the whole samples (sidecar n_answer)
    trained_targets: int  # targets the packed rows train
    seconds: float
    row_fill: np.ndarray = field(repr=False)  # real tokens per row

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "row_fill"}

    def format(self) -> str:
        lost = self.answer_targets - self.trained_targets
        return "\n".join([
            f"packed {self.prefix}: {self.samples:,} samples into {self.rows:,} rows of {self.seq_length:,} tokens "
            f"({self.algorithm}, overlong {self.overlong}, CP {self.context_parallel_size}) in {self.seconds:.3f} s",
            f"  efficiency {self.efficiency:.4f} ({self.real_tokens:,} real tokens; lower bound "
            f"{self.lower_bound_rows:,} rows)",
            f"  truncated {self.truncated:,} ({self.truncated_tokens:,} tokens), split {self.split:,}, "
            f"dropped {self.dropped:,} ({self.dropped_tokens:,} tokens)",
            f"  empty {self.empty:,} (kept samples without a trained target; {self.zero_length:,} have no tokens)",
            f"  targets trained {self.trained_targets:,} of {self.answer_targets:,} ({lost:,} lost to packing)",
        ])


def pack_prefix(prefix, seq_length: int, algorithm: str = "bfd", overlong: str = "truncate",
                context_parallel_size: int = 1) -> PackReport:
    """Pack PREFIX's samples (lengths from its sidecar, checked against its .idx; a plain
    Megatron prefix's from its .idx documents, as text samples) and count."""
    prefix = os.fspath(prefix)
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length < 1:
        raise ConfigError(f"--seq-length must be a positive integer, got {seq_length!r}")
    if isinstance(context_parallel_size, bool) or not isinstance(context_parallel_size, int) \
            or context_parallel_size < 1:
        raise ConfigError(f"--context-parallel-size must be an integer >= 1, got {context_parallel_size!r}")
    for suffix in (".idx", ".bin"):
        if not os.path.isfile(prefix + suffix):
            raise DataFormatError(
                f"{prefix}{suffix} not found: is {prefix!r} a prefix written by `tokweight prepare` or Megatron-LM?"
            )
    side = sample_metadata(prefix)
    count = read_idx_header(prefix + ".idx")["sequence_count"]
    if not side.plain and count != side.num_samples:
        raise DataFormatError(
            f"{prefix}.idx has {count} sequences but {side.where} describes {side.num_samples} samples"
        )
    cp_multiple = 2 * context_parallel_size if context_parallel_size > 1 else 1

    t0 = time.perf_counter()
    index, stats = build_pack_index(side.lengths, np.arange(side.num_samples), seq_length, algorithm, overlong,
                                    cp_multiple)
    n = trained_targets(index.pieces, side.span_offsets, side.spans, side.num_samples)
    seconds = time.perf_counter() - t0

    row_fill = np.bincount(index.pieces[:, ROW], weights=index.pieces[:, LENGTH], minlength=index.num_rows)
    return PackReport(
        prefix=prefix,
        seq_length=int(seq_length),
        algorithm=algorithm,
        overlong=overlong,
        context_parallel_size=context_parallel_size,
        rows=stats.rows,
        samples=stats.samples,
        real_tokens=stats.real_tokens,
        efficiency=stats.efficiency,
        lower_bound_rows=-(-stats.real_tokens // int(seq_length)),
        truncated=stats.truncated,
        split=stats.split,
        dropped=stats.dropped,
        empty=int(np.count_nonzero(n == 0)) - stats.dropped,  # dropped samples train nothing either
        zero_length=stats.zero_length,
        truncated_tokens=stats.truncated_tokens,
        dropped_tokens=stats.dropped_tokens,
        answer_targets=int(side.n_answer.sum(dtype=np.int64)),
        trained_targets=int(n.sum()),
        seconds=seconds,
        row_fill=row_fill.astype(np.int64),
    )


def plot_row_fill(report: PackReport, path) -> str:
    """PNG histogram of row fill (real tokens / seq_length per row)."""
    # an Agg canvas on its own figure: no global pyplot backend state is touched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(report.row_fill / report.seq_length, bins=np.linspace(0.0, 1.0, 41), color="#4472c4")
    axes.set_xlabel("row fill (real tokens / seq_length)")
    axes.set_ylabel("rows")
    axes.set_title(f"{os.path.basename(report.prefix)}: {report.rows:,} rows of {report.seq_length:,}, "
                   f"{report.algorithm}, efficiency {report.efficiency:.3f}", fontsize=9)
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(os.fspath(path), format="png")
    return os.fspath(path)
