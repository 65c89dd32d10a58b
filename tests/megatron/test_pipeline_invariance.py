"""Pipeline parallelism in the invariance matrix: Megatron-Core's own 1F1B schedule
(`forward_backward_pipelining_without_interleaving`), its `DistributedDataParallel` and
`finalize_model_grads`, with the plugin's loss function, on CPU over gloo.

A two-stage model with tied embeddings: stage 0 embeds (`VocabParallelEmbedding`) and runs a tanh
layer; stage 1 runs a second tanh layer and the output layer, whose weight is stage 1's copy of
the word embeddings (Megatron's tied layout: the copies' gradients are all-reduced over the
embedding group by `finalize_model_grads`). ONE spawn of 4 ranks runs

    (TP, PP, DP) in {(1, 2, 2), (2, 2, 1)} x micro-batches M in {1, 3} x 3 normalizations
    x calculate_per_token_loss in {False, True}

and the mutations below. Every stage reads the step's micro-batches and computes the global
normalizer Z over its DP x CP group (so every stage holds the same Z; the first stage has no
labels and computes no loss). The reference is one process in float64 (`F.cross_entropy`); loss
and every gradient (TP shards gathered, the tied embedding's two copies each checked) must match
within 1e-5 relative. Mutations that must break it: Z summed over the pipeline stages (a stats
group spanning PP: the weights counted on every stage) and Z per micro-batch at the last stage
(normalizing what the stage has seen instead of the global batch).

Stand-ins for CUDA-only spots, all inside the spawned ranks: `torch.cuda.current_device` returns
"cpu" (the p2p receive buffers, `pipeline_parallel/p2p_communication.py`, and DDP's grad buffers,
`distributed/param_and_grad_buffer.py`, are allocated there); a `TorchFunctionMode` maps
`device="cuda"` to the CPU around the schedule (`total_num_tokens` in `schedules.py`); and
`config.batch_p2p_sync = False` (the batched isend/irecv path's `torch.cuda.synchronize`); and on
megatron-core 0.19 a host `torch.cuda.current_stream()` for DDP's grad sync, which waits on
CUDA-graph events (`distributed/param_and_grad_buffer.py`).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from loss_batches import HIDDEN, ROWS, SEQ, VOCAB, global_batch  # noqa: E402
from pretrain_harness import CudaToCpu, HostStream  # noqa: E402

from megatron_tokweight.trainer.spawn import spawn

MODES = ("weight_sum", "sample_count", "token_count")
LAYOUTS = [(1, 2, 2), (2, 2, 1)]  # (TP, PP, DP) on 4 ranks
MICRO_BATCHES = (1, 3)
MUTATION_LAYOUT, MUTATION_M = (1, 2, 2), 3
TOL = 1e-5


def full_weights():
    g = torch.Generator().manual_seed(7)
    return {"embedding": torch.randn(VOCAB, HIDDEN, generator=g),
            "layer1.weight": torch.randn(HIDDEN, HIDDEN, generator=g) / math.sqrt(HIDDEN),
            "layer1.bias": torch.randn(HIDDEN, generator=g) * 0.1,
            "layer2.weight": torch.randn(HIDDEN, HIDDEN, generator=g) / math.sqrt(HIDDEN),
            "layer2.bias": torch.randn(HIDDEN, generator=g) * 0.1}


def reference(mode):
    """(loss, gradients) of one process in float64 on the whole global batch."""
    batch = global_batch()
    p = {k: v.double().requires_grad_() for k, v in full_weights().items()}
    h = torch.tanh(p["embedding"][batch["tokens"]] @ p["layer1.weight"].T + p["layer1.bias"])
    h = torch.tanh(h @ p["layer2.weight"].T + p["layer2.bias"])
    logits = h @ p["embedding"].T  # tied output layer
    l = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="none").reshape(ROWS, SEQ)
    w, mask = batch["loss_weights"].double(), batch["loss_mask"].double()
    z = {"weight_sum": w.sum(), "sample_count": batch["num_samples"].sum().double(), "token_count": mask.sum()}[mode]
    loss = (w * l).sum() / z
    loss.backward()
    return float(loss), {k: v.grad for k, v in p.items()}


# ----------------------------------------------------------------------------- on every rank


class Stage(torch.nn.Module):
    """One pipeline stage of the tied two-layer model (Megatron's chunk protocol: `config`,
    `set_input_tensor`, `pre_process`, `share_embeddings_and_output_weights`)."""

    def __init__(self, config, first: bool, tp_group):
        from megatron.core.enums import ModelType
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        super().__init__()
        self.model_type = ModelType.encoder_or_decoder
        self.config, self.pre_process, self.post_process = config, first, not first
        self.share_embeddings_and_output_weights = True
        self.input_tensor = None
        weights = full_weights()
        self.word_embeddings = VocabParallelEmbedding(VOCAB, HIDDEN, init_method=torch.nn.init.zeros_,
                                                      config=config, tp_group=tp_group)
        rank, size = tp_group.rank(), tp_group.size()
        shard = VOCAB // size
        with torch.no_grad():
            self.word_embeddings.weight.copy_(weights["embedding"][rank * shard:(rank + 1) * shard])
        self.layer = torch.nn.Linear(HIDDEN, HIDDEN)
        name = "layer1" if first else "layer2"
        with torch.no_grad():
            self.layer.weight.copy_(weights[f"{name}.weight"])
            self.layer.bias.copy_(weights[f"{name}.bias"])
        self.tp_group = tp_group

    def shared_embedding_or_output_weight(self):
        return self.word_embeddings.weight

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, tokens, labels):
        from megatron_tokweight.loss import per_token_cross_entropy

        if self.pre_process:  # [1, T] tokens -> [T, 1, H] hidden states for the next stage
            return torch.tanh(self.layer(self.word_embeddings(tokens).transpose(0, 1)))
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
        )

        h = torch.tanh(self.layer(self.input_tensor))
        # the output layer's input is replicated over TP: its gradient is all-reduced (Megatron's
        # ColumnParallelLinear with gather_output=False), then the vocab-parallel logits
        h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        logits = h @ self.word_embeddings.weight.T  # [T, 1, V/TP]: the tied output layer
        return per_token_cross_entropy(logits, labels.transpose(0, 1), self.tp_group).transpose(0, 1)


def _micro_batches(dp_rank, dp, m):
    """This DP rank's M micro-batches of the step, flattened to one row each ([1, rows*SEQ])."""
    batch = global_batch()
    per = ROWS // (dp * m)
    out = []
    for i in range(m):
        rows = slice((dp_rank * m + i) * per, (dp_rank * m + i + 1) * per)
        mb = {k: v[rows] for k, v in batch.items() if k not in ("dataset_id",)}
        flat = {k: v.reshape(1, -1) for k, v in mb.items() if v.dim() == 2}
        flat["num_samples"] = mb["num_samples"]
        out.append(flat)
    return out


def _run(tp, pp, dp, m, mode, per_token, variant):
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel.schedules import (
        forward_backward_pipelining_without_interleaving,
    )
    from megatron.core.transformer import TransformerConfig

    from megatron_tokweight.loss import LossSettings, make_loss_func

    # the layout's parallel state is set up by the caller (`_pipeline_rank`)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    first = parallel_state.is_pipeline_first_stage()
    config = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=2, tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               calculate_per_token_loss=per_token, hidden_dropout=0.0, attention_dropout=0.0,
                               use_cpu_initialization=True, perform_initialization=False)
    config.batch_p2p_sync = False
    stage = Stage(config, first, tp_group)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), stage)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync

    micro_batches = _micro_batches(parallel_state.get_data_parallel_rank(), dp, m)
    settings = LossSettings(mode, m, dp, per_token)
    if variant == "z-summed-over-pp":  # a stats group spanning the pipeline: every stage's weights counted
        stats = settings.global_batch_stats(micro_batches, _dp_x_pp_group(tp, pp, dp))
    else:
        stats = settings.global_batch_stats(micro_batches, dp_group)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if variant == "z-per-micro-batch":  # what the last stage has seen: this micro-batch alone
            one = LossSettings(mode, m, dp, per_token)
            local = one.global_batch_stats([batch], None)
            return model(batch["tokens"], batch["labels"]), make_loss_func(batch, local, one)
        return model(batch["tokens"], batch["labels"]), make_loss_func(batch, stats, settings)

    model.zero_grad_buffer()
    with CudaToCpu():
        losses = forward_backward_pipelining_without_interleaving(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=m, seq_length=micro_batches[0]["tokens"].shape[1], micro_batch_size=1)
    grads = {"embedding": stage.word_embeddings.weight.main_grad.clone(),
             f"layer{1 if first else 2}.weight": stage.layer.weight.main_grad.clone(),
             f"layer{1 if first else 2}.bias": stage.layer.bias.main_grad.clone()}
    return {"key": (tp, pp, dp, m, mode, per_token, variant), "first": first, "tp_rank": tp_group.rank(),
            "grads": grads, "reports": [dict(r) for r in losses] if losses else []}


_GROUPS = {}


def _dp_x_pp_group(tp, pp, dp):
    """The group of this rank's TP rank across all DP replicas and pipeline stages (collective)."""
    world = tp * pp * dp
    key = (tp, pp, dp)
    if key not in _GROUPS:
        groups = {}
        for t in range(tp):
            ranks = [r for r in range(world) if r % tp == t]
            groups[t] = torch.distributed.new_group(ranks)
        _GROUPS[key] = groups
    return _GROUPS[key][torch.distributed.get_rank() % tp]


def _pipeline_rank(rank, world_size):
    import megatron.core.pipeline_parallel.p2p_communication  # noqa: F401 (imported before the stand-in)

    torch.cuda.current_device = lambda: "cpu"  # p2p receive buffers and DDP's grad buffers
    # megatron-core 0.19 DDP (`distributed/param_and_grad_buffer.py`, start_grad_sync) waits on
    # the current stream for CUDA-graph events a CPU run never records
    torch.cuda.current_stream = lambda device=None: HostStream()
    from megatron.core import parallel_state

    cases = []
    for tp, pp, dp in LAYOUTS:  # one parallel state per layout (its gloo groups take seconds to make)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        try:
            for m in MICRO_BATCHES:
                for mode in MODES:
                    for per_token in (False, True):
                        cases.append(_run(tp, pp, dp, m, mode, per_token, "exact"))
            if (tp, pp, dp) == MUTATION_LAYOUT:
                for variant in ("z-summed-over-pp", "z-per-micro-batch"):
                    for mode in MODES:
                        cases.append(_run(tp, pp, dp, MUTATION_M, mode, False, variant))
        finally:
            parallel_state.destroy_model_parallel()
    return cases


# ----------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def pipeline_cases():
    """{key: [per-rank results]} from one spawn of 4 ranks."""
    cases = {}
    for rank_results in spawn(_pipeline_rank, 4):
        for result in rank_results:
            cases.setdefault(result["key"], []).append(result)
    return cases


def _worst_error(rank_results, mode):
    """Max over parameters and ranks of max|g - ref| / max|ref| (TP shards of the embedding
    compared with their rows of the reference; both tied copies checked)."""
    ref = reference(mode)[1]
    worst = 0.0
    for r in rank_results:
        for name, grad in r["grads"].items():
            want = ref[name]
            if name == "embedding":
                shard = grad.shape[0]
                want = want[r["tp_rank"] * shard:(r["tp_rank"] + 1) * shard]
            worst = max(worst, float((grad.double() - want).abs().max() / want.abs().max()))
    return worst


@pytest.mark.distributed
def test_pipeline_parallel_gradients_equal_the_single_process_reference(pipeline_cases):
    exact = {k: v for k, v in pipeline_cases.items() if k[-1] == "exact"}
    assert len(exact) == len(LAYOUTS) * len(MICRO_BATCHES) * len(MODES) * 2
    errors = {key: _worst_error(results, key[4]) for key, results in exact.items()}
    print(f"\npipeline invariance: worst relative gradient error {max(errors.values()):.2e} over {len(errors)} cases")
    assert max(errors.values()) <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.distributed
def test_the_last_stage_reports_the_objective(pipeline_cases):
    """`weighted loss` reduced as Megatron-LM's training loop does it (the [sum, count] pairs of
    the last stage's micro-batches, summed over DP) is L; the first stage, which has no labels,
    reports nothing."""
    for key, results in pipeline_cases.items():
        if key[-1] != "exact":
            continue
        assert all(r["reports"] == [] for r in results if r["first"])
        last = [r for r in results if not r["first"] and r["tp_rank"] == 0]  # one per DP rank
        total = sum(float(rep["weighted loss"][0]) for r in last for rep in r["reports"])
        count = sum(float(rep["weighted loss"][1]) for r in last for rep in r["reports"])
        assert total / count == pytest.approx(reference(key[4])[0], rel=TOL), key


@pytest.mark.distributed
def test_mutations_break_the_objective(pipeline_cases):
    broken = {k: v for k, v in pipeline_cases.items() if k[-1] != "exact"}
    assert len(broken) == 2 * len(MODES)
    errors = {key: _worst_error(results, key[4]) for key, results in broken.items()}
    print("\npipeline mutations: " + ", ".join(f"{k[-1]}/{k[4]} {e:.2e}" for k, e in sorted(errors.items())))
    assert min(errors.values()) > 1e-2, errors
