"""Invariance of the weighted loss and of every gradient under TP, DP, CP and micro-batching.

ONE spawn of 8 gloo ranks runs the whole matrix: a small Megatron-Core model whose embedding
(`VocabParallelEmbedding`) and output layer (`ColumnParallelLinear`, gather_output=False) are
sharded over an explicitly passed TP group, with a replicated tanh hidden layer between, trained
one step through `megatron_tokweight.trainer.forward_backward.forward_backward` (Megatron's loss protocol) with
`make_loss_func`, for

    TP in {1, 2, 4} x DP in {1, 2} x micro-batches M in {1, 3}, plus CP = 2 at the loss level
    (each row's tokens split over 2 CP ranks), x 3 normalizations x calculate_per_token_loss
    in {False, True}.

The same matrix runs the fused linear cross-entropy (`loss.fused_linear_weighted_cross_entropy`,
chunks of 5 tokens so chunks are ragged) in place of the output layer + cross-entropy, with
sequence parallel off and, where the sequence divides by TP, on (the hidden states enter as this
rank's sequence shard through `_ScatterSequence`, whose backward all-gathers, the semantics of
Megatron's `scatter_to_sequence_parallel_region`, which allocates on CUDA).

Megatron's parallel state is initialised with TP = 2, so the TP-2 configurations run Megatron's
own `vocab_parallel_cross_entropy` (their subgroups have the global TP group's ranks) and the TP-4
ones the explicit-group path.

The reference is one process in float64: `F.cross_entropy(reduction="none")` on the full global
batch with full weights. Loss, every report value and every parameter gradient (TP shards
gathered to full shape, checked on every DP/CP rank) must match with relative error <= 1e-5
(max |x - ref| / max |ref| per tensor). Mutations in the same run must break equality: weights
summed over the TP group, Z summed over TP x DP x CP, and per-micro-batch normalization.
"""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from loss_batches import DATASETS, HIDDEN, PAD, ROWS, SEQ, TASKS, VOCAB, global_batch  # noqa: E402

from megatron_tokweight.trainer.spawn import spawn

MODES = ("weight_sum", "sample_count", "token_count")
TOL = 1e-5
# (TP, DP, CP); every configuration occupies ranks 0 .. TP*DP*CP - 1 in Megatron's tp-cp-dp order
LAYOUTS = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 2, 1), (2, 2, 1), (4, 2, 1), (1, 2, 2), (2, 2, 2), (4, 1, 2)]
MICRO_BATCHES = (1, 3)
MUTATION_TP = (2, 2, 1, 3)  # (TP, DP, CP, M) for the TP mutations
MUTATION_MB = (1, 2, 1, 3)  # for per-micro-batch normalization
EXACT = ("exact", "fused", "fused-sp")  # variants that must equal the reference


# ----------------------------------------------------------------------------- data and weights


def full_weights():
    g = torch.Generator().manual_seed(99)
    return {
        "embedding": torch.randn(VOCAB, HIDDEN, generator=g),
        "hidden.weight": torch.randn(HIDDEN, HIDDEN, generator=g) / math.sqrt(HIDDEN),
        "hidden.bias": torch.randn(HIDDEN, generator=g) * 0.1,
        "output": torch.randn(VOCAB, HIDDEN, generator=g) / math.sqrt(HIDDEN),
    }


def reference(mode):
    """Loss, gradients (float64) and report values of one process on the full global batch."""
    batch = global_batch()
    params = {k: v.double().requires_grad_() for k, v in full_weights().items()}
    hidden = torch.tanh(params["embedding"][batch["tokens"]] @ params["hidden.weight"].T + params["hidden.bias"])
    logits = hidden @ params["output"].T
    l = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="none").reshape(ROWS, SEQ)
    w, mask = batch["loss_weights"].double(), batch["loss_mask"].double()
    z = {"weight_sum": w.sum(), "sample_count": batch["num_samples"].sum().double(), "token_count": mask.sum()}[mode]
    loss = (w * l).sum() / z
    loss.backward()
    l = l.detach()
    report = {"lm loss": float((l * mask).sum() / mask.sum()), "weighted loss": float(loss)}
    datasets = batch["dataset_id"][:, None].expand(ROWS, SEQ)
    for prefix, names, ids in (("task", TASKS, batch["task_ids"]), ("dataset", DATASETS, datasets)):
        for k, name in enumerate(names):
            sel = (ids == k) & (mask > 0)
            if sel.any():
                report[f"{prefix}/{name}/lm loss"] = float(l[sel].mean())
                report[f"{prefix}/{name}/weighted loss"] = float((w * l)[sel].sum() / w[sel].sum())
                report[f"{prefix}/{name}/loss tokens"] = float(sel.sum())
                report[f"{prefix}/{name}/weight share"] = float(w[sel].sum() / w.sum())
    grads = {
        "embedding.weight": params["embedding"].grad,
        "hidden.weight": params["hidden.weight"].grad,
        "hidden.bias": params["hidden.bias"].grad,
        "output_layer.weight": params["output"].grad,
    }
    return float(loss), grads, report


# ----------------------------------------------------------------------------- the ranks


def _cp_slice(value, cp, cp_rank):
    """This CP rank's tokens of [b, SEQ]: chunks cp_rank and 2cp-1-cp_rank of 2cp (Megatron's rule)."""
    if cp == 1:
        return value
    chunk = SEQ // (2 * cp)
    idx = list(range(cp_rank * chunk, (cp_rank + 1) * chunk)) + list(range((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk))
    return value[:, idx]


def _micro_batches(batch, dp, dp_rank, cp, cp_rank, m):
    rows = ROWS // dp
    per_mb = rows // m
    out = []
    for i in range(m):
        sel = slice(dp_rank * rows + i * per_mb, dp_rank * rows + (i + 1) * per_mb)
        mb = {k: (v[sel] if v.dim() == 1 else _cp_slice(v[sel], cp, cp_rank)) for k, v in batch.items()}
        out.append(mb)
    return out


class _ScatterSequence(torch.autograd.Function):
    """Forward: this rank's block of the sequence dimension; backward: all-gather of the blocks."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.chunk(group.size(), dim=0)[group.rank()].contiguous()

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        parts = [torch.empty_like(grad) for _ in range(ctx.group.size())]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=0), None


class TinyModel(torch.nn.Module):
    """Vocab-parallel embedding -> replicated tanh layer -> column-parallel output layer."""

    def __init__(self, tp_group, weights):
        super().__init__()
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel.layers import (
            ColumnParallelLinear,
            VocabParallelEmbedding,
        )

        tp, tp_rank = tp_group.size(), tp_group.rank()
        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=False)
        init = torch.nn.init.zeros_
        self.embedding = VocabParallelEmbedding(VOCAB, HIDDEN, init_method=init, config=config, tp_group=tp_group)
        self.hidden = torch.nn.Linear(HIDDEN, HIDDEN)
        self.output_layer = ColumnParallelLinear(
            HIDDEN, VOCAB, config=config, init_method=init, bias=False, gather_output=False, tp_group=tp_group
        )
        shard = slice(tp_rank * VOCAB // tp, (tp_rank + 1) * VOCAB // tp)
        with torch.no_grad():
            self.embedding.weight.copy_(weights["embedding"][shard])
            self.hidden.weight.copy_(weights["hidden.weight"])
            self.hidden.bias.copy_(weights["hidden.bias"])
            self.output_layer.weight.copy_(weights["output"][shard])

    def forward(self, tokens):
        logits, _ = self.output_layer(self._hidden(tokens))
        return logits  # [s, b, v / tp]

    def _hidden(self, tokens):
        return torch.tanh(self.hidden(self.embedding(tokens))).transpose(0, 1).contiguous()  # [s, b, h]

    def fused(self, micro_batch, tp_group, sequence_parallel):
        """(w l, log p) [b, s] through the fused linear cross-entropy on the output layer's weight."""
        from megatron_tokweight.loss import fused_linear_weighted_cross_entropy

        hidden = self._hidden(micro_batch["tokens"])
        if sequence_parallel:
            hidden = _ScatterSequence.apply(hidden, tp_group)
        weighted, logprob = fused_linear_weighted_cross_entropy(
            hidden, self.output_layer.weight, micro_batch["labels"].t(), micro_batch["loss_weights"].t(), tp_group,
            sequence_parallel=sequence_parallel, chunk_size=5, return_logprobs=True,
        )
        return weighted.t(), logprob.t()


def _forward_step(settings, tp_group, data_iterator, model):
    from megatron_tokweight.loss import make_loss_func, per_token_cross_entropy

    micro_batch, stats = next(data_iterator)
    logits = model(micro_batch["tokens"])
    per_token = per_token_cross_entropy(logits, micro_batch["labels"].t(), tp_group).t()
    return per_token, make_loss_func(micro_batch, stats, settings)


def _fused_forward_step(settings, tp_group, sequence_parallel, data_iterator, model):
    from megatron_tokweight.loss import make_loss_func

    micro_batch, stats = next(data_iterator)
    weighted, logprob = model.fused(micro_batch, tp_group, sequence_parallel)
    return weighted, make_loss_func(micro_batch, stats, settings, per_token_loss=-logprob)


def _variants(tp, cp):
    """The exact variants a layout runs: Megatron's path, fused, fused with sequence parallel."""
    variants = ["exact", "fused"]
    if tp > 1 and (SEQ // cp) % tp == 0:
        variants.append("fused-sp")
    return variants


def _layout_groups(tp, dp, cp):
    """Rank lists of the TP groups, DP x CP groups and the whole configuration."""
    size = tp * dp * cp
    tp_groups = [list(range(s, s + tp)) for s in range(0, size, tp)]
    dpcp_groups = [list(range(t, size, tp)) for t in range(tp)]
    return tp_groups, dpcp_groups, [list(range(size))]


def _matrix_rank(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_tokweight.loss import (
        GlobalBatchStats,
        LossSettings,
        cross_entropy_path,
        reduce_reports,
    )
    from megatron_tokweight.trainer.forward_backward import (
        ScheduleConfig,
        forward_backward,
    )

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
    groups = {}
    for layout in LAYOUTS:  # every rank creates every group, in the same order
        for ranks in sum(_layout_groups(*layout), []):
            if tuple(ranks) not in groups:
                groups[tuple(ranks)] = dist.new_group(ranks)

    batch, weights = global_batch(), full_weights()
    results = []
    for tp, dp, cp in LAYOUTS:
        if rank >= tp * dp * cp:
            continue  # idle: this configuration's collectives involve only its own ranks
        tp_rank, cp_rank, dp_rank = rank % tp, (rank // tp) % cp, rank // (tp * cp)
        tp_group = groups[tuple(range(rank - tp_rank, rank - tp_rank + tp))]
        dpcp_group = groups[tuple(range(tp_rank, tp * dp * cp, tp))]
        all_group = groups[tuple(range(tp * dp * cp))]
        model = TinyModel(tp_group, weights)
        path = cross_entropy_path(tp_group)

        def step(m, mode, per_token, variant="exact"):
            micro_batches = _micro_batches(batch, dp, dp_rank, cp, cp_rank, m)
            settings = LossSettings(mode, m, dp * cp, per_token, cp_rank, TASKS, DATASETS)
            if variant == "tp-summed-weights":
                for mb in micro_batches:
                    mb["loss_weights"] = mb["loss_weights"].clone()
                    dist.all_reduce(mb["loss_weights"], group=tp_group)
            stats_group = all_group if variant == "tp-summed-stats" else dpcp_group
            stats = [settings.global_batch_stats(micro_batches, stats_group)] * m
            if variant == "per-micro-batch":  # mean of micro-batch means: Z_i of micro-batch i alone, x M
                stats = []
                for mb in micro_batches:
                    s = settings.global_batch_stats([mb], dpcp_group)
                    stats.append(GlobalBatchStats(s.weight_sum * m, s.loss_tokens * m, s.num_samples * m, s.task_loss_tokens,
                                                  s.task_weight_sum, s.dataset_loss_tokens, s.dataset_weight_sum))
            model.zero_grad(set_to_none=True)
            forward_step = (partial(_fused_forward_step, settings, tp_group, variant == "fused-sp")
                            if variant.startswith("fused") else partial(_forward_step, settings, tp_group))
            reports, total = forward_backward(
                forward_step, iter(zip(micro_batches, stats)), model, m,
                ScheduleConfig(calculate_per_token_loss=per_token), dpcp_group, cp_size=cp,
            )
            results.append(dict(
                key=(tp, dp, cp, m, mode, per_token, variant), rank=rank, tp_rank=tp_rank, path=path,
                total_num_tokens=int(total), tokens_dtype=str(total.dtype),
                # the mutations' per-micro-batch stats give micro-batches different report keys
                report=reduce_reports(reports, dpcp_group) if variant in EXACT else None,
                grads={name: p.grad.detach().clone() for name, p in model.named_parameters()},
            ))

        for variant in _variants(tp, cp):
            for m in MICRO_BATCHES:
                for mode in MODES:
                    for per_token in (False, True):
                        step(m, mode, per_token, variant)
        for mode in MODES:
            if (tp, dp, cp) == MUTATION_TP[:3]:
                step(MUTATION_TP[3], mode, False, "tp-summed-weights")
                step(MUTATION_TP[3], mode, False, "tp-summed-stats")
            if (tp, dp, cp) == MUTATION_MB[:3]:
                step(MUTATION_MB[3], mode, False, "per-micro-batch")
    return results


# ----------------------------------------------------------------------------- the test


def _rel(value, ref):
    return float((value.double() - ref.double()).abs().max() / ref.double().abs().max())


def _assembled(rank_results):
    """Full-shape gradients from the TP shards; one entry per DP x CP replica."""
    by_replica = {}
    for r in rank_results:
        by_replica.setdefault(r["rank"] - r["tp_rank"], []).append(r)
    out = []
    for members in by_replica.values():
        members.sort(key=lambda r: r["tp_rank"])
        grads = {}
        for name in members[0]["grads"]:
            if name.startswith(("embedding", "output_layer")):
                grads[name] = torch.cat([r["grads"][name] for r in members])
            else:
                for r in members:  # replicated over TP: identical on every TP rank
                    assert torch.equal(r["grads"][name], members[0]["grads"][name]), name
                grads[name] = members[0]["grads"][name]
        out.append(grads)
    return out


def test_the_global_batch_keeps_the_mutation_checks_meaningful():
    batch = global_batch()
    dp, m = MUTATION_MB[1], MUTATION_MB[3]  # micro-batch i of the step: row block i of every DP shard
    for per_row in (batch["loss_mask"].sum(1), batch["num_samples"].double(), batch["loss_weights"].sum(1)):
        assert len(set(per_row.reshape(dp, m, -1).sum((0, 2)).tolist())) > 1
    assert (batch["loss_weights"][batch["loss_mask"] == 0] == 0).all() and (batch["labels"][batch["loss_mask"] == 0] == PAD).any()


@pytest.fixture(scope="module")
def matrix():
    """(exact cases, mutated cases): {key: [per-rank results]}, from one spawn of 8 ranks."""
    cases = {}
    for rank_results in spawn(_matrix_rank, 8):
        for r in rank_results:
            cases.setdefault(r["key"], []).append(r)
    exact = {key: results for key, results in cases.items() if key[-1] in EXACT}
    return exact, {key: results for key, results in cases.items() if key[-1] not in EXACT}


def _worst_grad_error(rank_results, ref_grads):
    return max(_rel(grads[name], ref_grads[name]) for grads in _assembled(rank_results) for name in ref_grads)


@pytest.mark.distributed
def test_loss_and_gradients_are_invariant_to_tp_dp_cp_and_micro_batches(matrix):
    exact, _ = matrix
    batch = global_batch()
    refs = {mode: reference(mode) for mode in MODES}
    per_variant = len(MICRO_BATCHES) * len(MODES) * 2
    assert len(exact) == sum(len(_variants(tp, cp)) for tp, _, cp in LAYOUTS) * per_variant
    assert {key[-1] for key in exact} == set(EXACT)
    failures, worst = [], {}
    for key, rank_results in sorted(exact.items(), key=lambda kv: str(kv[0])):
        tp, dp, cp, m, mode, per_token, variant = key
        assert len(rank_results) == tp * dp * cp, key
        _, ref_grads, ref_report = refs[mode]
        errors = [_worst_grad_error(rank_results, ref_grads)]
        for r in rank_results:
            assert r["tokens_dtype"] == "torch.int32"
            assert set(r["report"]) == set(ref_report), (key, sorted(r["report"]))
            errors += [abs(r["report"][k] - v) / max(abs(v), 1e-12) for k, v in ref_report.items()]
            if per_token:  # finalize's all-reduced int32 total is the global loss-token count
                assert r["total_num_tokens"] == int(batch["loss_mask"].sum()), key
        worst[variant] = max(worst.get(variant, 0.0), max(errors))
        if max(errors) > TOL:
            failures.append((key, max(errors)))
    print(f"worst relative error per variant (loss, reports, gradients): {worst}")
    assert not failures, f"{len(failures)} cases exceed {TOL}: {failures[:10]}"


@pytest.mark.distributed
def test_cross_entropy_path_per_tp_size(matrix):
    import inspect

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # TP = 2 is Megatron's global TP group; the others are groups of our own, which megatron-core
    # >= 0.19 takes as `tp_group=` and older versions do not
    own_group = ("megatron-tp-group" if "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters
                 else "explicit-group")
    exact, _ = matrix
    for key, rank_results in exact.items():
        expected_path = {1: own_group, 2: "megatron", 4: own_group}[key[0]]
        assert {r["path"] for r in rank_results} == {expected_path}, key


@pytest.mark.distributed
def test_mutations_break_the_objective(matrix):
    """Weights summed over TP break every mode but weight_sum (a uniform factor cancels there);
    Z counted over TP and per-micro-batch normalization break every mode."""
    _, broken = matrix
    assert len(broken) == 3 * len(MODES)
    ref_grads = {mode: reference(mode)[1] for mode in MODES}
    for key, rank_results in broken.items():
        variant, mode = key[-1], key[4]
        err = _worst_grad_error(rank_results, ref_grads[mode])
        if variant == "tp-summed-weights" and mode == "weight_sum":
            assert err <= TOL, (variant, mode, err)
        else:
            assert err > 1e-2, (variant, mode, err)
