"""Plain references for long-context weighting, shared by the long-context and Megatron-LM tests.

Independent of the scorers: every piece of a packed row (and every short-context window of the
formula) runs alone through the model, the log-probabilities come from `torch.log_softmax`, the
weights from docs/CONTRACTS.md section 2 in plain Python, and the loss is sum w l / Z with Z
counted from the rows.
"""
import math

import torch


def run_alone(model, tokens, positions):
    """log-softmax [n, V] (float64) of `tokens` run as one sequence of their own."""
    from megatron_tokweight.model.gpt import packed_logits

    n = len(tokens)
    cu = torch.tensor([0, n], dtype=torch.int32)
    batch = {"tokens": tokens.reshape(1, n), "position_ids": positions.reshape(1, n), "cu_seqlens": cu,
             "cu_seqlens_padded": cu, "num_segments": torch.tensor(1), "max_seqlen": torch.tensor(n)}
    with torch.no_grad():
        return torch.log_softmax(packed_logits(model, batch)[:, 0].double(), -1)


def pieces(rows, r):
    """[begin, end) of every piece of row r (from `cu_seqlens`)."""
    cu = rows["cu_seqlens"][r, : int(rows["num_segments"][r]) + 1].tolist()
    return list(zip(cu[:-1], cu[1:]))


def plain_logprobs(model, rows, n, stride, short=True):
    """(short, long) log p(label) [b, L] (float64, 0 off loss tokens) of collated packed rows.

    long: the piece alone; short: position t of a piece starting at b sees tokens [a, t] with
    a = b + k * stride, k = max(0, ceil((t - b + 1 - n) / stride)) (window k run alone).
    Window 0 starts where the piece does, so by causality it sees exactly the long context: its
    short log-probs are the long ones. Rerunning it as a shorter sequence would only add the CPU
    attention's length-dependent round-off (~4e-7 on AMD EPYC), which the dense formula's
    N * s / sum(s) turns into large weights for a piece whose loss tokens all lie in window 0."""
    long_lp = torch.zeros(rows["tokens"].shape, dtype=torch.float64)
    short_lp = torch.zeros_like(long_lp)
    tokens, positions, labels, mask = rows["tokens"], rows["position_ids"], rows["labels"], rows["loss_mask"]
    for r in range(tokens.shape[0]):
        for b, e in pieces(rows, r):
            loss = [t for t in range(b, e) if mask[r, t] > 0]
            if not loss:
                continue
            full = run_alone(model, tokens[r, b:e], positions[r, b:e])
            windows = {}
            for t in loss:
                long_lp[r, t] = full[t - b, labels[r, t]]
                windows.setdefault(b + max(0, math.ceil((t - b + 1 - n) / stride)) * stride, []).append(t)
            for a, kept in windows.items() if short else ():
                if a == b:
                    for t in kept:
                        short_lp[r, t] = long_lp[r, t]
                    continue
                part = run_alone(model, tokens[r, a:min(a + n, e)], positions[r, a:min(a + n, e)])
                for t in kept:
                    short_lp[r, t] = part[t - a, labels[r, t]]
    return short_lp, long_lp


def plain_dense(short, long, rows, lam):
    """w_t = lam + (1 - lam) * N * s_t / sum s per piece, s = |short - long|; 1 when
    sum s <= N * 1e-6 (scores at round-off level, the documented guard)."""
    weights = torch.zeros_like(long)
    for r in range(long.shape[0]):
        for b, e in pieces(rows, r):
            loss = [t for t in range(b, e) if rows["loss_mask"][r, t] > 0]
            s = [abs(float(short[r, t] - long[r, t])) for t in loss]
            total = sum(s)
            for t, s_t in zip(loss, s):
                weights[r, t] = lam + (1 - lam) * len(loss) * s_t / total if total > len(loss) * 1e-6 else 1.0
    return weights


def plain_top(values, rows, fraction):
    """1 on the top ceil(fraction * N) values of each piece (ties: earlier first), else 0."""
    keep = torch.zeros_like(values)
    for r in range(values.shape[0]):
        for b, e in pieces(rows, r):
            loss = [t for t in range(b, e) if rows["loss_mask"][r, t] > 0]
            order = sorted(loss, key=lambda t: (-float(values[r, t]), t))
            for t in order[: max(1, math.ceil(fraction * len(loss) - 1e-9))]:
                keep[r, t] = 1.0
    return keep


def plain_loss(long, weights, rows_list, mode):
    """sum w l / Z over a step's micro-batches; l = -log p(label) with the full context."""
    weighted = sum(float((w * -lp).sum()) for w, lp in zip(weights, long))
    z = {"weight_sum": sum(float(w.sum()) for w in weights),
         "sample_count": sum(int(r["num_samples"].sum()) for r in rows_list),
         "token_count": sum(int((r["loss_mask"] > 0).sum()) for r in rows_list)}[mode]
    return weighted / z
