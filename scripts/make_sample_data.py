"""Write the embedded sample dataset (examples/data/) deterministically.

Four small tasks with exact answers, so a tiny model trained for a couple of CPU minutes shows a clear drop in
eval loss: numbers written in words, opposites, irregular plurals and mixing colours. The text copy uses the
guide's Llama-2 prompt format (`<s>[INST] ... [/INST] ... </s>`, as in mlabonne/guanaco-llama2-1k); the chat copy
holds the same pairs as `messages`.

    python scripts/make_sample_data.py            # rewrites examples/data/*.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "open": "closed",
    "early": "late", "happy": "sad", "full": "empty", "hard": "soft", "high": "low", "long": "short",
    "old": "new", "rich": "poor", "strong": "weak", "thick": "thin", "wet": "dry", "clean": "dirty",
    "loud": "quiet", "near": "far", "first": "last", "left": "right", "inside": "outside", "push": "pull",
    "win": "lose", "buy": "sell", "give": "take", "day": "night", "north": "south", "east": "west",
    "love": "hate", "true": "false", "start": "finish", "above": "below", "heavy": "light", "sweet": "sour",
    "brave": "afraid", "cheap": "expensive", "deep": "shallow", "wide": "narrow",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese", "man": "men",
    "woman": "women", "person": "people", "ox": "oxen", "cactus": "cacti", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "half": "halves", "life": "lives", "city": "cities", "baby": "babies", "box": "boxes",
    "bus": "buses", "fish": "fish", "sheep": "sheep", "deer": "deer", "potato": "potatoes", "hero": "heroes",
    "crisis": "crises", "analysis": "analyses", "index": "indices", "datum": "data", "louse": "lice",
}
COLOURS = {
    ("red", "blue"): "purple", ("red", "yellow"): "orange", ("blue", "yellow"): "green",
    ("red", "white"): "pink", ("black", "white"): "grey", ("blue", "white"): "light blue",
    ("red", "green"): "brown", ("yellow", "white"): "cream",
}


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000, e.g. 347 -> 'three hundred forty-seven'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + (f"-{ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


def pairs(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for n in rng.sample(range(1000), 200):
        out.append((f"Write {n} in words.", f"{number_words(n).capitalize()}."))
    for word, opposite in OPPOSITES.items():
        out.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
        out.append((f"What is the opposite of {opposite}?", f"The opposite of {opposite} is {word}."))
    for word, plural in PLURALS.items():
        out.append((f"What is the plural of {word}?", f"The plural of {word} is {plural}."))
    for (a, b), mix in COLOURS.items():
        out.append((f"What colour do you get when you mix {a} and {b}?", f"Mixing {a} and {b} gives {mix}."))
        out.append((f"What colour do you get when you mix {b} and {a}?", f"Mixing {b} and {a} gives {mix}."))
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(1234)
    data = pairs(rng)
    root = Path(__file__).resolve().parent.parent / "examples" / "data"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "sample-text.jsonl", "w") as f:
        for q, a in data:
            f.write(json.dumps({"text": f"<s>[INST] {q} [/INST] {a} </s>"}) + "\n")
    with open(root / "sample-chat.jsonl", "w") as f:
        for q, a in data:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    print(f"wrote {len(data)} examples to {root}")


if __name__ == "__main__":
    main()
