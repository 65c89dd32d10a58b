"""Does long-context token weighting (Helm et al. 2025) improve a model's use of distant context?

A synthetic task in the spirit of RULER's key-value retrieval and variable tracking, byte
tokenizer, one `{"text"}` sample per packed row (loss on every token, as in pretraining):

    word word @c=7; word word ... @m=r; word ... ?c=7;?a=2;?m=5;

Filler words come from a small list (a word's later letters need only the few letters before
them: the short-context tokens); definitions `@k=v;` of random keys to random digits sit at
random places in the filler, a variable `@m=r;` refers to an earlier key r (its value is r's
value: two hops); at the end every key is queried `?k=v;`. A queried value is predictable only
from its definition, tens to hundreds of tokens back, beyond the scorer's short context n.

Arms (the real `tokweight train` loop, TP = DP = 1; every arm the same steps, rows, tokens,
learning-rate schedule and model; one seed gives every arm the same initial weights and rows):

    uniform                      every target 1.0
    dense lambda 0.5 / 0.75      w = lam + (1 - lam) N s / sum s,  s = |log p_short - log p_long|
    sparse kappa 0.25            the top quarter of s per sequence gets 4, the rest 0
    longce gamma 5               w = min(exp(l_short - l_long), 5)

each with the unfrozen scorer (the trained model scores each step) and the frozen scorer (the
same seed's uniform model, trained first with the same budget, scores the data once).
Measured on held-out samples built with a controlled distance between the definition and its
query: retrieval accuracy (argmax of the queried value, teacher forced) per distance and for the
two-hop variables, and the mean loss on filler-word letters after the first (short context).

    nice -n 15 python3 benchmarks/bench_effect_longcontext.py [--quick] [--workers 2]
        [--steps S --rows-per-step R --hidden-size H] [--arms TEXT ...] [--seeds ...]

writes benchmarks/results/effect_longcontext/{results.json, table.md, accuracy.png}.
"""
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List

import effect_common as common

SEEDS = (11, 22, 33)
RESULTS = os.path.join(common.REPO, "benchmarks", "results", "effect_longcontext")
KEYS, DIGITS = "abcdefghijklmnopqrstuvwxyz", "0123456789"
WORDS = ("the", "green", "house", "stands", "near", "old", "river", "where", "small", "birds", "sing",
         "every", "morning", "while", "children", "walk", "slowly", "towards", "school")
PAIRS = 4  # direct key-value definitions per sample (plus one two-hop variable)
DISTANCES = (24, 64, 128, 192)  # eval: bytes from a definition's value to its query's value
UNIFORM = "uniform"


@dataclass(frozen=True)
class Sizes:
    seq_length: int = 256
    sample_chars: int = 240  # the text of a sample (at most ~248 bytes); + <bos>, <eot>
    short_context: int = 32  # n: the scorer's short window (every eval distance but the first exceeds it)
    stride: int = 24  # 3n/4, the released configuration's ratio
    rows_per_step: int = 8
    steps: int = 1200
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    init_method_std: float = 0.1  # as tests/longcontext/test_longcontext_task.py: retrieval forms sooner
    # rotary positions: relative offsets come for free, and retrieval across varying distances
    # starts within the budget (uniform: 17-26% per distance at 1,200 x 8, chance 10%); with
    # learned absolute positions it stayed at chance up to 2,400 x 8 (README)
    position_embedding_type: str = "rope"
    lr: float = 3e-3
    train_samples: int = 1200
    eval_per_distance: int = 24


FULL = Sizes()
QUICK = Sizes(steps=6, rows_per_step=2, train_samples=64, eval_per_distance=4)


def arms() -> List[Dict[str, Any]]:
    methods = [("dense lam 0.5", {"method": "dense", "lambda": 0.5}),
               ("dense lam 0.75", {"method": "dense", "lambda": 0.75}),
               ("sparse kappa 0.25", {"method": "sparse", "kappa": 0.25}),
               ("longce gamma 5", {"method": "longce", "gamma": 5.0})]
    out = [{"name": UNIFORM, "long_context": None, "scorer": None}]
    for scorer in ("unfrozen", "frozen"):
        for name, fields in methods:
            out.append({"name": f"{name} ({scorer})", "long_context": dict(fields, scorer=scorer), "scorer": scorer})
    return out


# ----------------------------------------------------------------------------- the task


def filler(rng, chars: int) -> List[str]:
    words, used = [], 0
    while used < chars:
        words.append(rng.choice(WORDS))
        used += len(words[-1]) + 1
    return words


def make_sample(rng, chars: int, target_distance=None) -> Dict[str, Any]:
    """One sample's text and the character positions to measure.

    With `target_distance` d the first query's value lies d characters after its definition's
    value (eval); otherwise every definition sits at a random word boundary (training)."""
    keys = rng.sample(KEYS, PAIRS + 2)
    values = {k: rng.choice(DIGITS) for k in keys[:PAIRS + 1]}
    pairs, root, var = keys[:PAIRS], keys[PAIRS], keys[PAIRS + 1]
    values[var] = values[root]
    queries = [f"?{k}={values[k]};" for k in pairs]
    rng.shuffle(queries)
    queries.append(f"?{var}={values[var]};")
    tail = "".join(queries)
    body_chars = chars - len(tail) - 5 * (PAIRS + 2)
    words = filler(rng, body_chars)
    # definitions go between words: slot i = before word i
    slots: Dict[int, List[str]] = {}
    root_slot = rng.randrange(0, len(words) // 2)
    slots.setdefault(root_slot, []).append(f"@{root}={values[root]};")
    slots.setdefault(rng.randrange(root_slot + 1, len(words)), []).append(f"@{var}={root};")
    first = tail[1]  # the key queried first
    for k in pairs:
        if k == first and target_distance is not None:
            continue
        slots.setdefault(rng.randrange(0, len(words)), []).append(f"@{k}={values[k]};")
    text, filler_positions = "", []
    for i, word in enumerate(words):
        text += "".join(slots.get(i, []))
        filler_positions += range(len(text) + 1, len(text) + len(word))  # letters after the first
        text += word + " "
    body = text
    if target_distance is not None:
        # the definition's value must sit target_distance before the first query's value
        # (query value at len(body) + 3 once the definition is inserted)
        cut = len(body) + 5 + 3 - target_distance - 3  # where "@k=v;" starts
        cut = body.rfind(" ", 0, max(1, cut)) + 1  # a word boundary at or before it
        definition = f"@{first}={values[first]};"
        shift = len(definition)
        body = body[:cut] + definition + body[cut:]
        filler_positions = [p + shift if p >= cut else p for p in filler_positions]
    text = body + tail
    query_value = len(body) + 3  # "?k=" then the value
    kv_distance = query_value - (text.index(f"@{first}=") + 3)
    var_value = len(text) - 2
    return {"text": text, "query_value": query_value, "kv_distance": kv_distance, "var_value": var_value,
            "var_distance": var_value - (text.index(f"@{root}=") + 3), "filler": filler_positions,
            "expected": (values[first], values[var])}


def training_records(rng, count: int, chars: int) -> List[Dict[str, str]]:
    return [{"text": make_sample(rng, chars)["text"]} for _ in range(count)]


def eval_samples(rng, per_distance: int, chars: int) -> List[Dict[str, Any]]:
    out = []
    for d in DISTANCES:
        for _ in range(per_distance):
            s = make_sample(rng, chars, target_distance=d)
            s["bin"] = d
            out.append(s)
    return out


# ----------------------------------------------------------------------------- evaluation


def evaluate_task(model, samples, vocab_size: int) -> Dict[str, Any]:
    """Per sample: whether the argmax at the queried value (kv, two-hop variable) is right,
    and the filler letters' mean loss. Byte tokenizer: token i of a sample = <bos> then byte i - 1."""
    import torch

    from megatron_tokweight.data.tokenizer import ByteTokenizer
    from megatron_tokweight.model.gpt import packed_logits

    tok = ByteTokenizer()
    results, filler_loss, filler_count = [], 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), 16):
            group = samples[start:start + 16]
            seqs = [[tok.bos_id] + tok.encode(s["text"]) + [tok.eod_id] for s in group]
            lengths = [len(q) for q in seqs]
            offsets = torch.tensor([0] + lengths).cumsum(0)
            cu = offsets.to(torch.int32)
            batch = {"tokens": torch.tensor([t for q in seqs for t in q]).reshape(1, -1),
                     "position_ids": torch.cat([torch.arange(n) for n in lengths]).reshape(1, -1),
                     "cu_seqlens": cu, "cu_seqlens_padded": cu.clone(), "max_seqlen": torch.tensor(max(lengths))}
            logp = torch.log_softmax(packed_logits(model, batch)[:, 0, :vocab_size].float(), -1)  # [T, V]
            for s, q, off in zip(group, seqs, offsets.tolist()):
                # char c is token c + 1, predicted at position c
                def predicted(c):
                    return int(logp[off + c].argmax())
                kv = predicted(s["query_value"]) == q[s["query_value"] + 1]
                var = predicted(s["var_value"]) == q[s["var_value"] + 1]
                assert chr(q[s["query_value"] + 1]) == s["expected"][0] and chr(q[s["var_value"] + 1]) == s["expected"][1]
                idx = torch.tensor(s["filler"]) + off
                targets = torch.tensor([q[c + 1] for c in s["filler"]])
                filler_loss += float(-logp[idx, targets].sum())
                filler_count += len(s["filler"])
                results.append({"bin": s["bin"], "kv": kv, "var": var, "kv_distance": s["kv_distance"],
                                "var_distance": s["var_distance"]})
    acc = {}
    for d in DISTANCES:
        mine = [r for r in results if r["bin"] == d]
        acc[str(d)] = sum(r["kv"] for r in mine) / len(mine)
    return {"kv_accuracy": acc, "var_accuracy": sum(r["var"] for r in results) / len(results),
            "filler_loss": filler_loss / filler_count,
            "kv_distance_range": {str(d): [min(r["kv_distance"] for r in results if r["bin"] == d),
                                           max(r["kv_distance"] for r in results if r["bin"] == d)] for d in DISTANCES}}


# ----------------------------------------------------------------------------- runs


def train_config(prefix: str, sizes: Sizes, arm: Dict[str, Any], seed: int, save_dir: str):
    from megatron_tokweight.trainer.config import TrainConfig

    lc = None
    if arm["long_context"] is not None:
        lc = dict(arm["long_context"], n=sizes.short_context, stride=sizes.stride)
    return TrainConfig.from_dict({
        "data": {"prefixes": [prefix], "seq_length": sizes.seq_length, "overlong": "truncate"},
        "model": {"num_layers": sizes.num_layers, "hidden_size": sizes.hidden_size,
                  "num_attention_heads": sizes.num_attention_heads, "init_method_std": sizes.init_method_std,
                  "position_embedding_type": sizes.position_embedding_type},
        "weighting": None,
        "long_context": lc,
        "optimizer": {"lr": sizes.lr, "min_lr": sizes.lr / 10, "warmup_steps": max(1, sizes.steps // 10)},
        # one micro-batch of all the step's rows: the same sums as row by row (uniform, 300 steps:
        # the same accuracies and filler loss), 44 s against 72 s (not side by side)
        "steps": sizes.steps, "micro_batch_size": sizes.rows_per_step, "num_micro_batches": 1,
        "seed": seed, "log_interval": sizes.steps, "save_dir": save_dir,
    }, where=f"{arm['name']} seed {seed}")


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Train one arm x seed, evaluate it; the uniform arm keeps its checkpoint as the frozen scorer."""
    import shutil as sh

    from megatron_tokweight.longcontext.scorer_offline import load_scorer, open_checkpoint
    from megatron_tokweight.trainer.loop import train_on_rank

    t0 = time.perf_counter()
    plan = job["plan"]
    result = train_on_rank(plan, 0, common.one_rank_groups())
    import torch.distributed as dist

    model = load_scorer(open_checkpoint(plan.config.save_dir), plan.vocab_size, dist.new_group([0]), 0)
    if not job["keep_checkpoint"]:
        sh.rmtree(plan.config.save_dir, ignore_errors=True)
    metrics = evaluate_task(model, job["eval"], plan.vocab_size)
    scoring = sum(s.scoring_seconds for s in result.steps)
    return {"arm": job["arm"], "seed": job["seed"], **metrics, "train_seconds": result.train_seconds,
            "scoring_seconds": scoring, "real_tokens": result.real_tokens,
            "final_train_loss": result.steps[-1].reports["lm loss"], "seconds": time.perf_counter() - t0,
            "summary": (f"kv acc {' '.join(f'{v:.2f}' for v in metrics['kv_accuracy'].values())}, var "
                        f"{metrics['var_accuracy']:.2f}, filler loss {metrics['filler_loss']:.3f}")}


def score_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """The frozen scorer: the seed's uniform checkpoint scores the seed's training prefix."""
    import torch.distributed as dist

    from megatron_tokweight.longcontext.scorer_offline import load_scorer, open_checkpoint, score_dataset

    t0 = time.perf_counter()
    ckpt = open_checkpoint(job["checkpoint"])
    model = load_scorer(ckpt, job["vocab_size"], dist.new_group([0]), 0)
    report = score_dataset(job["prefix"], model, model_vocab_size=job["vocab_size"], model_seq_length=ckpt.seq_length,
                           short_context=job["n"], stride=job["stride"], progress=False)
    return {"seed": job["seed"], "seconds": time.perf_counter() - t0, "summary": f"scored {report.num_tokens} tokens"}


def aggregate(runs, arm_names) -> Dict[str, Any]:
    out = {}
    for arm in arm_names:
        mine = [r for r in runs if r["arm"] == arm]
        row = {f"kv@{d}": common.spread([r["kv_accuracy"][str(d)] for r in mine]) for d in DISTANCES}
        row["var"] = common.spread([r["var_accuracy"] for r in mine])
        row["filler_loss"] = common.spread([r["filler_loss"] for r in mine])
        row["train_seconds"] = common.spread([r["train_seconds"] for r in mine])
        out[arm] = row
    return out


def markdown(agg, arm_names, meta) -> str:
    s = meta["sizes"]
    head = " | ".join(f"kv acc @{d}" for d in DISTANCES)
    lines = [f"2 layers x {s['hidden_size']}, {s.get('position_embedding_type', 'learned_absolute')} positions, "
             f"N = {s['seq_length']}, n = {s['short_context']}, stride {s['stride']}, "
             f"{s['rows_per_step']} rows x {s['steps']} steps (every arm the same rows), seeds {list(meta['seeds'])}; "
             f"{meta['eval_per_distance']} held-out samples per distance",
             "", f"| arm | {head} | two-hop variable acc | filler loss (short context) | train s |",
             "|---|" + "---|" * (len(DISTANCES) + 3)]
    for arm in arm_names:
        r = agg[arm]
        accs = " | ".join(f"{100 * r[f'kv@{d}']['mean']:.0f}% [{100 * r[f'kv@{d}']['min']:.0f}, "
                          f"{100 * r[f'kv@{d}']['max']:.0f}]" for d in DISTANCES)
        lines.append(f"| {arm} | {accs} | {100 * r['var']['mean']:.0f}% [{100 * r['var']['min']:.0f}, "
                     f"{100 * r['var']['max']:.0f}] | {common.fmt(r['filler_loss'])} | "
                     f"{r['train_seconds']['mean']:.0f} |")
    lines += ["", "Accuracy: mean over seeds [min, max]; chance is 10% (ten digits). Distance: bytes from the "
              "definition's value to the query's value (the first bin is within n). Filler loss: mean "
              "over filler-word letters after the first, mean ± std [min, max]."]
    return "\n".join(lines)


def plot(agg, arm_names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, arm in enumerate(arm_names):
        r = agg[arm]
        color = "black" if arm == UNIFORM else colors[(k - 1) % 4]
        style = "--" if arm == UNIFORM else ("-" if "unfrozen" in arm else ":")
        means = [100 * r[f"kv@{d}"]["mean"] for d in DISTANCES]
        lo = [100 * r[f"kv@{d}"]["min"] for d in DISTANCES]
        hi = [100 * r[f"kv@{d}"]["max"] for d in DISTANCES]
        ax1.errorbar(DISTANCES, means, yerr=[[m - a for m, a in zip(means, lo)], [b - m for m, b in zip(means, hi)]],
                     fmt=style, color=color, marker="o", markersize=3, capsize=2, label=arm, alpha=0.9)
        f = r["filler_loss"]
        ax2.errorbar([100 * r["var"]["mean"]], [f["mean"]], yerr=[[f["mean"] - f["min"]], [f["max"] - f["mean"]]],
                     xerr=[[100 * (r["var"]["mean"] - r["var"]["min"])], [100 * (r["var"]["max"] - r["var"]["mean"])]],
                     fmt="s" if "unfrozen" in arm else ("o" if arm != UNIFORM else "D"), color=color, capsize=2,
                     label=arm)
    ax1.axhline(10, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("distance definition -> query (bytes)")
    ax1.set_ylabel("retrieval accuracy (%), mean; bars: min-max")
    ax1.set_title("key-value retrieval (held-out)", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("two-hop variable accuracy (%)")
    ax2.set_ylabel("filler-letter loss (short context)")
    ax2.set_title("variable tracking vs short-context loss", fontsize=10)
    ax2.grid(alpha=0.3)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    common.setup_path()
    parser = common.base_parser(__doc__, RESULTS, SEEDS)
    args = parser.parse_args(argv)
    if args.replot:
        common.replot(args.replot, write_outputs)
        return 0
    sizes = common.with_budget(QUICK if args.quick else FULL, args)
    # enough distinct samples that no row repeats within the budget
    sizes = replace(sizes, train_samples=max(sizes.train_samples, sizes.steps * sizes.rows_per_step))
    seeds = args.seeds[:1] if args.quick else args.seeds
    out_dir = args.out or (tempfile.mkdtemp(prefix="effect-longcontext-quick-") if args.quick else RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    arm_list = common.select_arms(arms(), args.arms, UNIFORM)  # frozen arms need the uniform model
    t0 = time.perf_counter()
    print(f"effect_longcontext: {len(arm_list)} arms x {len(seeds)} seeds, {args.workers} workers; {common.cpu_note()}",
          flush=True)
    work = tempfile.mkdtemp(prefix="effect-longcontext-")
    try:
        from megatron_tokweight.data.prepare import prepare_jsonl
        from megatron_tokweight.trainer.plan import plan_run

        rng = random.Random(2025)  # the data: fixed, the same for every seed and arm
        records = training_records(rng, sizes.train_samples, sizes.sample_chars)
        held_out = eval_samples(rng, sizes.eval_per_distance, sizes.sample_chars)
        with open(os.path.join(work, "train.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        prefixes = {}
        for seed in seeds:  # one prefix per seed: each holds its own frozen scorer's scores
            prefixes[seed] = os.path.join(work, f"seed{seed}", "train")
            prepare_jsonl(os.path.join(work, "train.jsonl"), prefixes[seed])

        def jobs_for(scorer_kinds):
            jobs = []
            for seed in seeds:
                for arm in arm_list:
                    if arm["scorer"] in scorer_kinds:
                        save_dir = os.path.join(work, "runs", f"{arm['name'].replace(' ', '_')}-{seed}")
                        plan = plan_run(train_config(prefixes[seed], sizes, arm, seed, save_dir))
                        jobs.append({"arm": arm["name"], "seed": seed, "plan": plan, "eval": held_out,
                                     "keep_checkpoint": arm["name"] == UNIFORM})
            return jobs

        label = lambda j: f"{j['arm']:26s} seed {j['seed']}"  # noqa: E731
        print("phase 1: uniform and unfrozen-scorer arms", flush=True)
        first = jobs_for((None, "unfrozen"))
        runs = common.run_jobs(run_job, first, args.workers, label=label)
        scoring = []
        if any(arm["scorer"] == "frozen" for arm in arm_list):  # --arms may leave none
            print("phase 2: each seed's uniform model scores the training data (frozen scorer)", flush=True)
            vocab = first[0]["plan"].vocab_size
            scoring = common.run_jobs(score_job, [
                {"seed": seed, "checkpoint": os.path.join(work, "runs", f"{UNIFORM}-{seed}"), "prefix": prefixes[seed],
                 "vocab_size": vocab, "n": sizes.short_context, "stride": sizes.stride} for seed in seeds],
                args.workers, label=lambda j: f"scorer seed {j['seed']}")
            print("phase 3: frozen-scorer arms", flush=True)
            runs += common.run_jobs(run_job, jobs_for(("frozen",)), args.workers, label=label)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"sizes": asdict(sizes), "seeds": seeds, "arms": arm_list, "distances": DISTANCES,
            "eval_per_distance": sizes.eval_per_distance, "wall_seconds": time.perf_counter() - t0,
            "workers": args.workers, "scoring": scoring, "quick": args.quick, "cpu": common.cpu_note()}
    write_outputs(out_dir, meta, runs)
    return 0


def write_outputs(out_dir: str, meta: Dict[str, Any], runs: List[Dict[str, Any]]) -> None:
    """results.json, table.md and accuracy.png from the runs (also `--replot DIR`)."""
    arm_names = [a["name"] for a in meta["arms"]]
    agg = aggregate(runs, arm_names)
    common.write_results(out_dir, {"meta": meta, "aggregate": agg, "runs": runs}, markdown(agg, arm_names, meta),
                         meta["wall_seconds"], meta["workers"])
    plot(agg, arm_names, os.path.join(out_dir, "accuracy.png"))
    print(f"wrote {out_dir}/accuracy.png")


if __name__ == "__main__":
    raise SystemExit(main())
