"""The offline RLHF demo: prompts and preference pairs in TRL's JSONL formats, from real English
text that ships with every Python (the CPython documentation, ``pydoc_data.topics``).

**The preference: finish the sentence, then stop.** Each example is a sentence of the docs
(8 to 40 words, ending with a full stop). The prompt asks to finish it and gives its first
40-60% of words; the *chosen* answer is the rest of the sentence. The *rejected* answer is, at
random, either that rest run on into the page's next sentence (it does not stop), or the rest
cut off before its last words (it does not finish). A reward model learns to score "ends the
sentence once, at the end" above both; PPO can raise that score by teaching the policy to close
its sentence and emit EOS. ``zoo.models.rlhf.finished_sentence`` is the same rule as a
programmatic reward.

Layout (``data_dir``): ``prompts/{train,val,test}.jsonl`` (``{"prompt": ...}``) and
``preferences/{train,val,test}.jsonl`` (``{"prompt", "chosen", "rejected"}``). Pages are split
between train, val and test, so no held-out sentence was seen in training.
"""

from __future__ import annotations

import json
import platform
import random
import re
from pathlib import Path

from zoo.data.demo import manifest_matches, publish, staging_dir
from zoo.data.demo.pydoc import sentences_of

GENERATOR_VERSION = 2
INSTRUCTION = "Finish this sentence from the Python documentation: "


def _examples(pages: list[list[str]], rng: random.Random) -> list[dict[str, str]]:
    out = []
    for sentences in pages:
        for i, s in enumerate(sentences):
            words = s.split()
            if not (8 <= len(words) <= 40) or not s.endswith(".") or re.search(r"[.!?]\s", s):
                continue  # one sentence, one full stop (footnotes such as "[1]" split badly)
            cut = max(3, int(len(words) * rng.uniform(0.4, 0.6)))
            prompt, rest = " ".join(words[:cut]), " ".join(words[cut:])
            nxt = sentences[i + 1] if i + 1 < len(sentences) else None
            if nxt is not None and rng.random() < 0.5:
                rejected = f"{rest} {nxt}"  # runs on
            else:
                rest_words = rest.split()
                keep = max(1, len(rest_words) - rng.randint(2, 4))
                rejected = " ".join(rest_words[:keep]).rstrip(".,;:")  # stops short
                if rejected == rest.rstrip("."):
                    rejected = f"{rest} {sentences[i - 1]}" if i else rest + " and so on"
            out.append({"prompt": INSTRUCTION + prompt, "chosen": rest, "rejected": rejected})
    return out


def write_demo_rlhf(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 64,
    n_test: int = 64,
    seed: int = 0,
) -> Path:
    """Write (or reuse, if its manifest matches) the demo under ``out_dir``: at most
    ``n_<split>`` examples per split, each both a prompt and a preference pair."""
    from pydoc_data.topics import topics

    out_dir = Path(out_dir)
    spec = {"version": GENERATOR_VERSION, "n": [n_train, n_val, n_test], "seed": seed}
    if manifest_matches(out_dir, spec, ignore=("python", "counts")):
        return out_dir
    rng = random.Random(seed)
    names = sorted(topics)
    rng.shuffle(names)
    a, b = int(len(names) * 0.8), int(len(names) * 0.9)
    groups = {"train": names[:a], "val": names[a:b], "test": names[b:]}
    tmp = staging_dir(out_dir)
    counts = {}
    for split, wanted in (("train", n_train), ("val", n_val), ("test", n_test)):
        pages = [sentences_of(topics[n], min_words=3, max_words=80) for n in groups[split]]
        rows = _examples(pages, rng)
        rng.shuffle(rows)
        rows = rows[:wanted]
        counts[split] = len(rows)
        for folder, keys in (
            ("prompts", ("prompt",)),
            ("preferences", ("prompt", "chosen", "rejected")),
        ):
            (tmp / folder).mkdir(exist_ok=True)
            with (tmp / folder / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({k: row[k] for k in keys}) + "\n")
    return publish(tmp, out_dir, spec | {"python": platform.python_version(), "counts": counts})
