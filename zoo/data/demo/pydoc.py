"""An offline GLUE-format task from real English text that ships with every Python: the CPython
documentation (``pydoc_data.topics``, 79 pages on statements, expressions, types, ...) and,
optionally, the docstrings of the standard library's modules (read with ``ast``, never
imported: about 650 files, 15,000 prose sentences).

``pydoc_continuity`` (a sentence-pair task in the format of RTE/QNLI): does sentence2 follow
sentence1 in the same text (``next``), or is it a sentence from another page or module of the
same split (``not_next``)? Pages and modules are split between train/dev/test, so no test
sentence was seen in training. Files: train.tsv, dev.tsv, test.tsv with header
``index sentence1 sentence2 label``, plus corpus.txt (every prose sentence, for tokenizer
training or MLM). The texts are those of the Python that writes the task, so they differ a
little between Python versions (the manifest records which one wrote it).
"""

from __future__ import annotations

import json
import platform
import random
from pathlib import Path

from zoo.data.demo import manifest_matches
from zoo.errors import ConfigError

GENERATOR_VERSION = 2
SOURCES = ("topics", "docstrings")
# standard-library folders whose docstrings are not prose about the library itself
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip"}


def write_demo_glue(
    out_dir: str | Path,
    n_train: int = 4000,
    n_dev: int = 500,
    n_test: int = 500,
    seed: int = 0,
    sources: tuple[str, ...] | list[str] = ("topics",),
    split: tuple[float, float] | list[float] = (0.8, 0.9),
) -> Path:
    """Write (or reuse, if its manifest matches) the pydoc_continuity task under ``out_dir``.

    ``sources``: ``topics`` (the documentation pages) and/or ``docstrings`` (the standard
    library's docstrings, one group per module file). ``split``: the cumulative shares of the
    sentences whose groups go to train, then dev (the rest is test)."""
    out_dir = Path(out_dir)
    sources = list(sources)
    bad = [x for x in sources if x not in SOURCES] or ([] if sources else ["(none)"])
    if bad:
        raise ConfigError(f"data.demo.sources={sources}: expected some of {list(SOURCES)}")
    cut_train, cut_dev = (float(x) for x in split)
    if not 0.0 < cut_train < cut_dev < 1.0:
        raise ConfigError(f"data.demo.split={list(split)}: expected 0 < train < dev < 1")
    spec = {
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_dev": n_dev,
        "n_test": n_test,
        "seed": seed,
    }
    if sources != ["topics"] or (cut_train, cut_dev) != (0.8, 0.9):  # the first demo's spec
        spec |= {"sources": sources, "split": [cut_train, cut_dev]}
    if manifest_matches(out_dir, spec, ignore=("python",)):
        return out_dir
    rng = random.Random(seed)
    # group -> its texts, each a list of sentences (pairs never cross a text)
    groups: dict[str, list[list[str]]] = {}
    if "topics" in sources:
        from pydoc_data.topics import topics

        for name, text in sorted(topics.items()):
            if len(sentences := sentences_of(text)) >= 2:
                groups[name] = [sentences]
    if "docstrings" in sources:
        groups |= {k: v for k, v in stdlib_docstrings().items() if v}
    names = sorted(groups)
    rng.shuffle(names)
    size = {n: sum(len(t) for t in groups[n]) for n in names}
    total = sum(size.values())
    split_groups: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    acc = 0
    for n in names:
        share = acc / total
        split_groups["train" if share < cut_train else "dev" if share < cut_dev else "test"].append(
            n
        )
        acc += size[n]
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "dev": n_dev, "test": n_test}
    # some sentences recur in several groups: held-out splits drop any that training has
    seen = {s for n in split_groups["train"] for t in groups[n] for s in t}
    for split_name, wanted in counts.items():
        own = split_groups[split_name]
        train = split_name == "train"
        usable = {n: [s for t in groups[n] for s in t if train or s not in seen] for n in own}
        pairs = [
            (n, a, b)
            for n in own
            for t in groups[n]
            for a, b in zip(t, t[1:])
            if train or (a not in seen and b not in seen)
        ]
        rng.shuffle(pairs)
        rows = []
        for page, a, b in pairs[: (wanted + 1) // 2]:
            rows.append((a, b, "next"))
            others = [n for n in own if n != page and usable[n]] or [page]
            rows.append((a, rng.choice(usable[rng.choice(others)]), "not_next"))
        rng.shuffle(rows)
        rows = rows[:wanted]
        with (out_dir / f"{split_name}.tsv").open("w", encoding="utf-8") as f:
            f.write("index\tsentence1\tsentence2\tlabel\n")
            for i, (a, b, label) in enumerate(rows):
                f.write(f"{i}\t{a}\t{b}\t{label}\n")
    (out_dir / "corpus.txt").write_text(
        "\n".join(s for n in names for t in groups[n] for s in t) + "\n", encoding="utf-8"
    )
    manifest = spec | {"python": platform.python_version()}
    (out_dir / "demo.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


def stdlib_docstrings() -> dict[str, list[list[str]]]:
    """The prose sentences of every docstring (module, class, function) in the standard
    library's source files, per file (``docstrings:<relative path>``), parsed with ``ast``."""
    import ast
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately not valid Python 3 (test data, bad encodings)
        texts = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(sentences := sentences_of(doc)) >= 2:
                    texts.append(sentences)
        out[f"docstrings:{rel.as_posix()}"] = texts
    return out


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
