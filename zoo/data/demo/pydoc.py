"""An offline GLUE-format task from real English text: the CPython documentation that ships with
every Python (``pydoc_data.topics``, 79 pages on statements, expressions, types, ...).

``pydoc_continuity`` (a sentence-pair task in the format of RTE/QNLI): does sentence2 follow
sentence1 on the same documentation page (``next``), or is it a sentence from another page
(``not_next``)? Pages are split between train/dev/test, so no test sentence was seen in
training. Files: train.tsv, dev.tsv, test.tsv with header ``index sentence1 sentence2 label``,
plus corpus.txt (every prose sentence, for tokenizer training or MLM).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from zoo.data.demo import manifest_matches

GENERATOR_VERSION = 2


def write_demo_glue(
    out_dir: str | Path,
    n_train: int = 4000,
    n_dev: int = 500,
    n_test: int = 500,
    seed: int = 0,
) -> Path:
    """Write (or reuse, if its manifest matches) the pydoc_continuity task under ``out_dir``."""
    from pydoc_data.topics import topics

    out_dir = Path(out_dir)
    spec = {
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_dev": n_dev,
        "n_test": n_test,
        "seed": seed,
    }
    if manifest_matches(out_dir, spec):
        return out_dir
    rng = random.Random(seed)
    pages = {name: sentences_of(text) for name, text in sorted(topics.items())}
    pages = {k: v for k, v in pages.items() if len(v) >= 2}
    names = sorted(pages)
    rng.shuffle(names)
    # pages by share of sentences: ~80 % train, 10 % dev, 10 % test
    total = sum(len(pages[n]) for n in names)
    split_pages: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    acc = 0
    for n in names:
        share = acc / total
        split_pages["train" if share < 0.8 else "dev" if share < 0.9 else "test"].append(n)
        acc += len(pages[n])
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "dev": n_dev, "test": n_test}
    # some sentences recur on several pages: held-out splits drop any that training has
    seen = {s for n in split_pages["train"] for s in pages[n]}
    for split, wanted in counts.items():
        own = split_pages[split]
        usable = {n: [s for s in pages[n] if split == "train" or s not in seen] for n in own}
        pairs = [
            (n, a, b)
            for n in own
            for a, b in zip(pages[n], pages[n][1:])
            if split == "train" or (a not in seen and b not in seen)
        ]
        rng.shuffle(pairs)
        rows = []
        for page, a, b in pairs[: (wanted + 1) // 2]:
            rows.append((a, b, "next"))
            others = [n for n in own if n != page and usable[n]] or [page]
            rows.append((a, rng.choice(usable[rng.choice(others)]), "not_next"))
        rng.shuffle(rows)
        rows = rows[:wanted]
        with (out_dir / f"{split}.tsv").open("w", encoding="utf-8") as f:
            f.write("index\tsentence1\tsentence2\tlabel\n")
            for i, (a, b, label) in enumerate(rows):
                f.write(f"{i}\t{a}\t{b}\t{label}\n")
    (out_dir / "corpus.txt").write_text(
        "\n".join(s for n in names for s in pages[n]) + "\n", encoding="utf-8"
    )
    (out_dir / "demo.json").write_text(json.dumps(spec, indent=1))
    return out_dir


def sentences_of(text: str, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Prose sentences of a documentation page (indented code/grammar blocks and headings
    dropped)."""
    import re

    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or lines[0].startswith((" ", "\t")) or set(lines[-1].strip()) <= set("*=-~^"):
            continue
        joined = " ".join(line.strip() for line in lines)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", joined):
            if min_words <= len(s.split()) <= max_words:
                out.append(s.replace("\t", " "))
    return out
