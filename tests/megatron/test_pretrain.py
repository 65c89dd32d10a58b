"""Megatron-LM's training loop itself: `megatron.training.pretrain()` of megatron-core 0.19 through
`examples/pretrain_gpt_tokweight.py` (the plugin's arguments, datasets provider and forward_step,
packed rows of a prepared prefix), on CPU over gloo with the stand-ins of `pretrain_harness`.

One spawn of 4 ranks per layout (TP, PP, DP) = (2, 1, 2), (1, 2, 2), (2, 2, 1) runs one iteration
(SGD, 4 packed rows per step: 1 or 2 micro-batches of one row per DP rank, the same full weights
whatever the layout) in each normalization mode, and one with `--tokweight-fused-ce torch`, the `--calculate-per-token-loss` setting
alternating so that every mode meets both; then, on TP 2 x DP 2, four iterations straight, and two
iterations, a checkpoint, and a resumption to four. The reference is computed in the same ranks afterwards,
with TP = PP = 1: the same model on the step's four rows, `F.cross_entropy(reduction="none")` in
float64, L = sum w l / Z. Asserted: the logged `weighted loss` is L and every gradient after
Megatron's DDP and `finalize_model_grads` (`main_grad`; TP shards compared with their slice, both
tied embedding copies under PP) equals dL/dparam, within 1e-5 relative; the per-task reports
reach Megatron's logged loss dict; the resumed run logs the same losses and ends with the same
gradients as the straight one.
"""
import importlib.util
import inspect
import math

import pytest
import torch

TOL = 1e-5
MODES = ("weight_sum", "sample_count", "token_count")
ROWS_PER_STEP, SEQ, VOCAB, LR = 4, 64, 512, 0.1


def _requires_019():
    if importlib.util.find_spec("megatron.training") is None:
        pytest.skip("megatron.training is not installed (megatron-core < 0.19 ships without it; CI's lane 2 runs this)")
    from pretrain_harness import python311_compat

    python311_compat()
    import megatron.training

    if "extra_args_provider" in inspect.signature(megatron.training.pretrain).parameters:
        pytest.skip("this megatron.training has the pre-0.19 pretrain signature")


def base_argv(prefix, cache):
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--micro-batch-size", "1", "--global-batch-size", str(ROWS_PER_STEP),
            "--lr", str(LR), "--lr-decay-style", "constant", "--optimizer", "sgd", "--sgd-momentum", "0",
            "--weight-decay", "0", "--clip-grad", "0", "--data-path", prefix, "--split", "1,0,0",
            "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "128", "--data-cache-path", cache,
            "--token-weighting-preset", "molmo2", "--transformer-impl", "local", "--distributed-backend", "gloo",
            "--position-embedding-type", "learned_absolute", "--no-gradient-accumulation-fusion",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1", "--eval-iters", "0",
            "--eval-interval", "1000", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
            "--no-bias-dropout-fusion", "--no-rope-fusion", "--use-cpu-initialization", "--no-persist-layer-norm",
            "--ckpt-format", "torch", "--seed", "11", "--num-workers", "0"]


def layout_argv(tp, pp, dp):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


def _reference(prefix, cache, mode):
    """(L, {global name: full gradient}) with TP = PP = 1 on the step's rows (on every rank)."""
    import sys

    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.training.arguments import parse_and_validate_args
    from pretrain_harness import (
        deterministic_parameters,
        load_example,
        reset_megatron_globals,
    )

    from megatron_tokweight.data.packed_dataset import build_packed_datasets
    from megatron_tokweight.data.thd_batch import flatten_rows
    from megatron_tokweight.megatron import extra_args_provider
    from megatron_tokweight.megatron.datasets_provider import (
        packed_dataset_config_from_args,
    )
    from megatron_tokweight.model.gpt import packed_logits

    saved = sys.argv
    sys.argv = ["reference", *base_argv(prefix, cache), "--train-iters", "1", "--loss-normalization", mode]
    try:
        args = parse_and_validate_args(extra_args_provider, args_defaults={"tokenizer_type": "NullTokenizer"})
    finally:
        sys.argv = saved
    parallel_state.initialize_model_parallel(1, 1)
    try:
        model = load_example().model_provider(pre_process=True, post_process=True)
        deterministic_parameters(model)
        train = build_packed_datasets(packed_dataset_config_from_args(args), [ROWS_PER_STEP, 0, 0])[0]
        rows = [train[i] for i in range(ROWS_PER_STEP)]
        total, weights, tokens, samples = 0.0, 0.0, 0, 0
        for row in rows:
            batch = flatten_rows({k: v.unsqueeze(0) for k, v in row.items() if torch.is_tensor(v)})
            logits = packed_logits(model, batch).reshape(-1, VOCAB).double()
            loss = F.cross_entropy(logits, batch["labels"].reshape(-1), reduction="none")
            w = batch["loss_weights"].reshape(-1).double()
            total = total + (w * loss).sum()
            weights += float(w.sum())
            tokens += int((batch["loss_mask"] > 0).sum())
            samples += int(row["num_samples"])
        z = {"weight_sum": weights, "sample_count": samples, "token_count": tokens}[mode]
        objective = total / z
        objective.backward()
        grads = {name: p.grad.detach().double().clone() for name, p in model.named_parameters()}
        return float(objective), grads
    finally:
        reset_megatron_globals()


# every layout in every normalization mode, and every mode in both --calculate-per-token-loss
# settings; one spawn per layout (a second layout in the same processes hangs in Megatron's
# leftover global state)
CASES = {(2, 1, 2): [("weight_sum", False), ("sample_count", True), ("token_count", False)],
         (1, 2, 2): [("weight_sum", True), ("sample_count", False), ("token_count", True)],
         (2, 2, 1): [("weight_sum", False), ("sample_count", True), ("token_count", False)]}
RESUME_LAYOUT = (2, 1, 2)
FUSED_CASES = {(2, 1, 2): ("sample_count", False), (1, 2, 2): ("weight_sum", True), (2, 2, 1): ("token_count", True)}


def _pretrain_rank(rank, world_size, layout, prefix, cache, save_root):
    import os

    from pretrain_harness import install_stand_ins, reset_megatron_globals, run_pretrain

    install_stand_ins()
    # Megatron-LM's arguments read the world from the environment (torch.distributed is up already)
    # (and validate_args wants CUDA_DEVICE_MAX_CONNECTIONS=1 under TP, as on a GPU: harmless here)
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
    out = {"runs": {}, "references": {}}

    def run(key, argv):
        losses, params = run_pretrain(argv)
        reset_megatron_globals()
        out["runs"][key] = {"losses": losses, "grads": _grads_of(params)}

    tp, pp, dp = layout
    base = base_argv(prefix, cache) + layout_argv(tp, pp, dp)
    for mode, per_token in CASES[layout]:
        run(("step", tp, pp, dp, mode, per_token),
            base + ["--train-iters", "1", "--loss-normalization", mode] + ["--calculate-per-token-loss"] * per_token)
    mode, per_token = FUSED_CASES[layout]  # the fused linear cross-entropy in Megatron-LM's own loop
    run(("step", tp, pp, dp, mode, per_token, "fused"),
        base + ["--train-iters", "1", "--loss-normalization", mode, "--tokweight-fused-ce", "torch"]
        + ["--calculate-per-token-loss"] * per_token)
    if layout == RESUME_LAYOUT:
        resume = base + ["--train-iters", "4"]
        run("straight", resume)
        part = f"{save_root}/part"
        run("first half", resume + ["--exit-interval", "2", "--save", part, "--save-interval", "2"])
        # --no-load-rng: on CPU there is no CUDA RNG tracker state to restore (checkpointing.py gives
        # up without it); with dropout 0 and a fixed data order nothing in a step draws from an RNG
        run("resumed", resume + ["--load", part, "--save", part, "--save-interval", "2", "--no-load-rng"])
        for mode in MODES:  # after the runs: the reference's TP = PP = 1 in the same processes
            out["references"][mode] = _reference(prefix, cache, mode)
    return out


def _grads_of(params):
    """main_grad of every parameter after the last step, by global name (None if none ran)."""
    return params[max(params)] if params else None


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory, prepared_prefix):
    _requires_019()
    from megatron_tokweight.trainer.spawn import spawn

    root = tmp_path_factory.mktemp("pretrain")
    import random

    rng = random.Random(5)
    records = [{"prompt": "".join(rng.choice("abcdef ") for _ in range(rng.randint(2, 20))),
                "response": "".join(rng.choice("ghijk ") for _ in range(rng.randint(1, 30))),
                "task": ("qa", "caption")[i % 2]} for i in range(120)]
    prefix = prepared_prefix(root, "train", records)
    per_layout = {layout: spawn(_pretrain_rank, 4, layout, prefix, str(root / "cache"), str(root / f"save{i}"))
                  for i, layout in enumerate(CASES)}
    # one record per rank: every layout's runs, the resume runs and the references together
    merged = [{"runs": {}, "references": {}} for _ in range(4)]
    for results in per_layout.values():
        for rank, result in enumerate(results):
            merged[rank]["runs"].update(result["runs"])
            merged[rank]["references"].update(result["references"])
    return merged


def _relative_error(got, want) -> float:
    return float((got.double() - want).abs().max() / max(float(want.abs().max()), 1e-30))


def _worst_gradient_error(rank_runs, reference_grads):
    worst = 0.0
    for grads in rank_runs:
        for name, (grad, tp_rank, dim) in grads.items():
            want = reference_grads[name]
            if dim is not None:
                size = grad.shape[dim]
                want = want.narrow(dim, tp_rank * size, size)
            worst = max(worst, _relative_error(grad, want))
    return worst


@pytest.mark.distributed
def test_pretrain_gradients_equal_the_single_process_objective(pretrain_runs):
    errors = {}
    for key in pretrain_runs[0]["runs"]:
        if key[0] != "step":
            continue
        reference = pretrain_runs[0]["references"][key[4]][1]
        errors[key] = _worst_gradient_error([r["runs"][key]["grads"] for r in pretrain_runs], reference)
    fused = [error for key, error in errors.items() if key[-1] == "fused"]
    assert len(fused) == len(FUSED_CASES)
    print(f"\npretrain(): worst relative gradient error {max(errors.values()):.2e} over {len(errors)} runs "
          f"({max(fused):.2e} over the {len(fused)} fused ones)")
    assert {(k[4], k[5]) for k in errors} == {(m, t) for m in MODES for t in (False, True)}
    assert {(k[1:4], k[4]) for k in errors} == {(layout, m) for layout in CASES for m in MODES}
    assert max(errors.values()) <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:4]


@pytest.mark.distributed
def test_pretrain_logs_the_objective_and_the_task_reports(pretrain_runs):
    worst = 0.0
    for key in pretrain_runs[0]["runs"]:
        if key[0] != "step":
            continue
        want = pretrain_runs[0]["references"][key[4]][0]
        logged = [r["runs"][key]["losses"][0] for r in pretrain_runs if r["runs"][key]["losses"]
                  and "weighted loss" in r["runs"][key]["losses"][0]]
        assert logged, key  # the last pipeline stage logs the losses
        for loss_dict in logged:
            worst = max(worst, abs(loss_dict["weighted loss"] - want) / want)
            assert {"task/qa/lm loss", "task/caption/weighted loss", "task/qa/weight share"} <= set(loss_dict), key
            assert all(math.isfinite(v) for v in loss_dict.values())
    print(f"\npretrain(): worst relative error of the logged weighted loss {worst:.2e}")
    assert worst <= TOL


@pytest.mark.distributed
def test_checkpoint_resume_continues_the_run(pretrain_runs):
    for r in pretrain_runs:
        straight, resumed = r["runs"]["straight"], r["runs"]["resumed"]
        assert len(straight["losses"]) == 4 and len(r["runs"]["first half"]["losses"]) == 2
        assert len(resumed["losses"]) == 2  # iterations 3 and 4 only
        for a, b in zip(straight["losses"][2:], resumed["losses"]):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
        for name, (grad, _, _) in straight["grads"].items():
            assert _relative_error(resumed["grads"][name][0], grad.double()) <= 1e-6, name
