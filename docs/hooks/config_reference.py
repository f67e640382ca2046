"""MkDocs hook: the configuration reference (reference/config.md), generated from conf/ at
build time, so it lists every config group, option and key with its default and the comment
the YAML file gives it.

``python docs/hooks/config_reference.py`` prints the page (what the build would publish).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PAGE = "reference/config.md"

_KEY = re.compile(
    r"^(?P<indent> *)(?P<key>[^\s#:'\"-][^:#]*?|'[^']*'|\"[^\"]*\"):(?:\s+|$)(?P<rest>.*)$"
)
_ITEM = re.compile(r"^(?P<indent> *)- ?(?P<rest>.*)$")


@dataclass
class Entry:
    key: str  # dotted path
    default: str  # the value as the file writes it ("" for a mapping)
    comment: str = ""
    items: list[str] = field(default_factory=list)  # a block list's items


def _split_comment(text: str) -> tuple[str, str]:
    """Value and comment of a YAML line's rest (a # inside quotes or ${...} is not a comment)."""
    quote, depth = None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def parse(path: Path) -> tuple[str, list[Entry]]:
    """The file's header (its leading comment lines) and its keys, in file order."""
    lines = path.read_text().splitlines()
    header, entries = [], []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    pending: list[str] = []  # full-line comments just above the next key
    block: tuple[int, Entry] | None = None  # an open block scalar (| or >) and its entry
    seen_key = False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if block is not None:
            if not stripped or indent > block[0]:
                block[1].default = (block[1].default + " " + stripped).strip()
                continue
            block = None
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not seen_key and not stripped.startswith("# @package"):
                header.append(text)
            elif seen_key:
                pending.append(text)
            continue
        item = _ITEM.match(line)
        if item and entries:
            value, comment = _split_comment(item.group("rest"))
            owner = entries[-1]
            owner.items.append(value + (f"  ({comment})" if comment else ""))
            pending = []
            continue
        match = _KEY.match(line)
        if not match:
            continue
        seen_key = True
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match.group("key").strip("'\"")
        dotted = ".".join([k for _, k in stack] + [key])
        value, comment = _split_comment(match.group("rest"))
        comment = " ".join([*pending, comment]).strip()
        pending = []
        entry = Entry(dotted, value, comment)
        entries.append(entry)
        if value in ("|", ">", "|-", ">-", "|+", ">+"):
            entry.default = ""
            block = (indent, entry)
        elif value == "":
            stack.append((indent, key))
    return " ".join(header), entries


def package(path: Path) -> str:
    """The dotted prefix a file's keys have in the composed config: its ``# @package``, else
    its group's path (``model/eeg_cnn_lstm.yaml``: ``model``); the top-level configs: none."""
    for line in path.read_text().splitlines()[:5]:
        if line.startswith("# @package"):
            name = line.split(None, 2)[2].strip()
            return "" if name == "_global_" else name
    group = path.parent.relative_to(CONF)
    return "" if str(group) == "." else ".".join(group.parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _prose(text: str) -> str:
    """A YAML comment as Markdown text: no HTML tags, no emphasis."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "*[]_`":
        text = text.replace(ch, "\\" + ch)
    return _cell(text)


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def table(entries: list[Entry], prefix: str = "") -> list[str]:
    rows = ["| key | default | comment |", "|---|---|---|"]
    for e in entries:
        default = e.default
        if e.items:
            default = "[" + ", ".join(i.split("  (")[0] for i in e.items) + "]"
            notes = [i.split("  (", 1)[1].rstrip(")") for i in e.items if "  (" in i]
            comment = " ".join([e.comment, *notes]).strip()
        else:
            comment = e.comment
        if not default and not e.items:  # a mapping: its keys follow
            continue
        key = f"{prefix}.{e.key}" if prefix else e.key
        rows.append(f"| `{_cell(key)}` | {_cell(_code(default))} | {_prose(comment)} |")
    return rows


def _title(path: Path) -> str:
    rel = path.relative_to(CONF).with_suffix("")
    return str(rel)


def groups() -> dict[str, list[Path]]:
    """Group name ('' for the top-level configs) -> its option files."""
    out: dict[str, list[Path]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        group = str(path.parent.relative_to(CONF)).replace("\\", "/")
        out.setdefault("" if group == "." else group, []).append(path)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "", kv[0])))


def render() -> str:
    lines = [
        "# Configuration keys",
        "",
        "Every config group, option and key in `conf/`, with its default and the comment beside",
        "it in the YAML file, each key under the name it has on the command line. This page is",
        "generated from `conf/` when the site is built",
        "(`docs/hooks/config_reference.py`), so it always matches the code. A key is set on the",
        "command line as `group.key=value` (e.g. `data.batch_size=32`), a group's option as",
        "`group=option` (e.g. `model=eeg_cnn_gru`); an `experiment/` file overrides several groups",
        "at once. `python train.py --cfg job [overrides]` prints the composed config.",
        "",
        "Hydra's own options, not files in `conf/`: `hydra/launcher=basic` (the default: a",
        "multirun's jobs one after another) and `hydra/sweeper=basic` (the default grid sweep).",
        "`paths/default` puts everything under the working directory (`$ZOO_ROOT`) and the data",
        "under `data/` (`$ZOO_DATA_DIR`).",
        "",
    ]
    found = groups()
    lines += ["| group | options |", "|---|---|"]
    for group, files in found.items():
        name = f"`{group}/`" if group else "top level"
        links = ", ".join(f"[`{p.stem}`](#{_anchor(p)})" for p in files)
        lines.append(f"| {name} | {links} |")
    lines.append("")
    for group, files in found.items():
        lines += [f"## {group + '/' if group else 'Top-level configs'}", ""]
        for path in files:
            header, entries = parse(path)
            lines += [f"### {_title(path)} {{#{_anchor(path)}}}", ""]
            rel = path.relative_to(ROOT)
            usage = (
                f"`{group.split('/')[-1] if '/' in group else group}={path.stem}`"
                if group and not group.startswith("hydra")
                else ""
            )
            if group.startswith("hydra/"):
                usage = f"`{group}={path.stem}`"
            lines.append(f"`{rel}`" + (f"; choose it with {usage}." if usage else "."))
            lines.append("")
            if header:
                lines += [_prose(header), ""]
            defaults = [e for e in entries if e.key == "defaults"]
            if defaults and defaults[0].items:
                lines += ["Defaults list: " + ", ".join(f"`{i}`" for i in defaults[0].items), ""]
            rows = table([e for e in entries if e.key != "defaults"], package(path))
            if len(rows) > 2:
                lines += [*rows, ""]
    return "\n".join(lines) + "\n"


def _anchor(path: Path) -> str:
    return "conf-" + re.sub(r"[^a-z0-9]+", "-", str(path.relative_to(CONF).with_suffix("")).lower())


def on_files(files, config, **kwargs):
    """Add the generated page to the build (mkdocs >= 1.6)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    print(render())
