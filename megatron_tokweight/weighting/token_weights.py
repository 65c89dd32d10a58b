"""w_t, the weight of one target token: the one definition (docs/CONTRACTS.md section 2).

    w_t = w_i * f_t * g_t   on a target position of sample i, 0 on prompt, padding and boundaries

- w_i, the sample weight: the task rule of n_i (the targets sample i keeps once packed) times the
  annotation factor 1/K^q (`sample_rules`, through `Weighter.sample_weights`). The C++ row gather
  (`data.row_gather`) writes loss_mask x w_i into a row's `loss_weights`;
- f_t, the token factor: stop-token x frequency x span-kind factors of the target (`token_rules`,
  through `Weighter.token_factors`), multiplied in by `PackedDataset` for each row it reads;
- g_t, the long-context factor (`longcontext.scores`): multiplied in with the rows for a frozen
  scorer (`ScoredRows`), or before each step for the unfrozen one (`OnlineScorer`).

Every factor after w_i enters through `compose_token_weights`, the only place a token weight is
multiplied: the product is checked finite (a float32 overflow is an error naming the position),
never silently inf or NaN.
"""
from typing import Callable, Optional

import numpy as np

from megatron_tokweight.errors import TokweightError


def compose_token_weights(weights, factors, names=("weight", "factor"),
                          explain: Optional[Callable[[int], str]] = None):
    """`weights` (the row's weights so far) times `factors` (one more factor per position).

    numpy arrays or torch tensors of one shape; the result has the type and dtype of `weights`.
    A non-finite product raises TokweightError naming the first such position, the two values
    (as `names`) and `explain(position)` when given."""
    if tuple(np.shape(weights)) != tuple(np.shape(factors)):
        raise TokweightError(
            f"token weights {tuple(np.shape(weights))} and factors {tuple(np.shape(factors))} differ in shape"
        )
    if isinstance(weights, np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            product = weights * np.asarray(factors, dtype=weights.dtype)
        finite = np.isfinite(product)
        bad = None if finite.all() else int(np.flatnonzero(~finite.reshape(-1))[0])
    else:
        product = weights * factors.to(device=weights.device, dtype=weights.dtype)
        finite = product.isfinite()
        bad = None if bool(finite.all()) else int((~finite).reshape(-1).nonzero()[0])
    if bad is not None:
        flat_w, flat_f = weights.reshape(-1), factors.reshape(-1)
        detail = f" ({explain(bad)})" if explain is not None else ""
        raise TokweightError(
            f"position {bad}: {names[0]} {float(flat_w[bad]):g} x {names[1]} {float(flat_f[bad]):g}{detail} "
            "overflows float32; lower the task rule, the token-rule factors or the long-context weights"
        )
    return product
