"""The demo's embedded multi-task corpus: deterministic, generated, nothing downloaded.

Four tasks with Molmo2's length disparity, each answer a function of its prompt (learnable):

| task              | answer                                            | answer tokens (bytes) |
|-------------------|---------------------------------------------------|-----------------------|
| `caption`         | a long templated description of 3-5 listed objects | ~250-450             |
| `pointing`        | `<points x1=".." y1=".." ... alt="cat">cat</points>` for the named object | ~45-130 |
| `multiple_choice` | one letter: the category of a word (A-D)          | 1 (+ end of turn)     |
| `short_answer`    | a number 1-99 written in words                     | ~3-13                 |

Task names match the `molmo2` preset's globs (`*caption*` 0.1, `*point*` 0.2, others 4/sqrt(n)).
Lines are prompt/response JSONL with a `task` field (`megatron_tokweight.data.jsonl_shapes`).
"""
import json
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

TASKS = ("caption", "pointing", "multiple_choice", "short_answer")
# share of samples per task (the token shares follow from the lengths)
DEFAULT_MIX = {"caption": 0.25, "pointing": 0.25, "multiple_choice": 0.3, "short_answer": 0.2}

COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
SIZES = ("small", "large", "tiny", "huge")
PLACES = ("left", "right", "center", "top", "bottom")
NOUNS = ("cat", "dog", "car", "tree", "house", "boat", "lamp", "chair", "bird", "cup")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# the words' first letters are all distinct: the answer is a function of one prompt byte
CATEGORIES = {
    "A": ("animal", ("horse", "tiger", "zebra")),
    "B": ("metal", ("iron", "copper", "gold")),
    "C": ("food", ("bread", "apple", "rice")),
    "D": ("tool", ("saw", "drill", "wrench")),
}
OPTIONS = " ".join(f"{letter}) {name}" for letter, (name, _) in CATEGORIES.items())

ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_in_words(n: int) -> str:
    if not 1 <= n <= 99:
        raise ValueError(f"number_in_words covers 1..99, got {n}")
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")


def caption_sample(rng: random.Random) -> Tuple[str, str]:
    count = rng.randint(3, 5)
    places = rng.sample(PLACES, count)
    objects = [(rng.choice(SIZES), rng.choice(COLORS), rng.choice(NOUNS), p) for p in places]
    prompt = "describe: " + "; ".join(f"{s} {c} {n} {p}" for s, c, n, p in objects)
    sentences = [f"The image shows {NUMBER_WORDS[count]} objects on a plain background."]
    for size, color, noun, place in objects:
        where = "In the center" if place == "center" else f"At the {place}"
        sentences.append(f"{where} there is a {size} {color} {noun}.")
    first, last = objects[0], objects[-1]
    sentences.append(
        f"The {first[1]} {first[2]} is far from the {last[1]} {last[2]}, "
        f"and the light is soft and even."
    )
    return prompt, " ".join(sentences)


def pointing_sample(rng: random.Random) -> Tuple[str, str]:
    target = rng.choice(NOUNS)
    hits = rng.randint(1, 4)
    others = [n for n in NOUNS if n != target]
    items = [target] * hits + [rng.choice(others) for _ in range(rng.randint(1, 3))]
    rng.shuffle(items)
    spots = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in items]
    prompt = f"point to: {target} | scene: " + " ; ".join(
        f"{name} {x},{y}" for name, (x, y) in zip(items, spots)
    )
    coords = [xy for name, xy in zip(items, spots) if name == target]
    attrs = " ".join(f'x{i}="{x}" y{i}="{y}"' for i, (x, y) in enumerate(coords, 1))
    return prompt, f'<points {attrs} alt="{target}">{target}</points>'


def multiple_choice_sample(rng: random.Random) -> Tuple[str, str]:
    letter = rng.choice(sorted(CATEGORIES))
    word = rng.choice(CATEGORIES[letter][1])
    return f"category of {word}? {OPTIONS}", letter


def short_answer_sample(rng: random.Random) -> Tuple[str, str]:
    n = rng.randint(1, 99)
    return f"write {n} in words", number_in_words(n)


GENERATORS = {
    "caption": caption_sample,
    "pointing": pointing_sample,
    "multiple_choice": multiple_choice_sample,
    "short_answer": short_answer_sample,
}


@dataclass(frozen=True)
class CorpusConfig:
    num_train: int = 2400
    num_eval: int = 240
    seed: int = 1

    def __post_init__(self):
        if self.num_train < len(TASKS) or self.num_eval < len(TASKS):
            raise ValueError(
                f"the demo corpus needs at least {len(TASKS)} train and eval samples "
                f"(one per task), got num_train={self.num_train}, num_eval={self.num_eval}"
            )


def iter_records(num: int, seed: int, mix: Dict[str, float] = DEFAULT_MIX) -> Iterator[dict]:
    """`num` prompt/response records; the task of each is drawn with probabilities `mix`."""
    rng = random.Random(seed)
    tasks, probs = zip(*mix.items())
    for _ in range(num):
        task = rng.choices(tasks, probs)[0]
        prompt, response = GENERATORS[task](rng)
        yield {"task": task, "prompt": prompt, "response": response}


def write_corpus(directory, config: CorpusConfig = CorpusConfig()) -> Dict[str, str]:
    """Write train.jsonl and eval.jsonl (disjoint seeds) under `directory`; return their paths."""
    import os

    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, num, seed in (("train", config.num_train, config.seed),
                             ("eval", config.num_eval, config.seed + 1_000_003)):
        path = os.path.join(directory, f"{split}.jsonl")
        with open(path, "w") as out:
            for record in iter_records(num, seed):
                out.write(json.dumps(record) + "\n")
        paths[split] = path
    return paths


def describe(records: List[dict]) -> Dict[str, dict]:
    """Per task: samples and mean answer length in characters (for the demo's printout)."""
    stats: Dict[str, dict] = {}
    for record in records:
        entry = stats.setdefault(record["task"], {"samples": 0, "answer_chars": 0})
        entry["samples"] += 1
        entry["answer_chars"] += len(record["response"])
    for entry in stats.values():
        entry["mean_answer_chars"] = entry.pop("answer_chars") / entry["samples"]
    return stats
