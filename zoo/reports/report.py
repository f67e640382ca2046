"""A small document model rendered to Markdown (images beside it) and to one self-contained
HTML file (images inlined as base64, no external requests)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.outputs import Section

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2433;
     max-width:1100px;margin:2em auto;padding:0 1em}
h1{border-bottom:2px solid #3b6fd8;padding-bottom:.3em}
h2{margin-top:1.8em;color:#23408e}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccd3e0;padding:.35em .7em;text-align:left}
th{background:#eef2fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}
figcaption{color:#555;font-size:.9em}
img{max-width:100%;height:auto;border:1px solid #e3e7ef}
pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:.85em}
details summary{cursor:pointer;color:#23408e}
.meta{color:#555}
"""


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "image"


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (list(headers), [list(r) for r in rows])))

    def key_values(self, items: dict[str, Any], headers: tuple[str, str] = ("", "")) -> None:
        self.table(list(headers), [[k, v] for k, v in items.items()])

    def image(self, fig_or_png, caption: str, name: str | None = None) -> None:
        if isinstance(fig_or_png, (bytes, bytearray)):
            png = bytes(fig_or_png)
        else:
            from zoo.plotting import close

            buf = io.BytesIO()
            fig_or_png.savefig(buf, format="png", dpi=100)
            close(fig_or_png)
            png = buf.getvalue()
        self.blocks.append(("image", (name or _slug(caption), png, caption)))

    def add(self, section: Section) -> dict[str, float]:
        """Append a model's section (``zoo.outputs.Section``); returns its extra metrics."""
        self.heading(section.title)
        for kind, data in section.blocks:
            if kind == "image":
                name, caption, build = data
                self.image(build(), caption, name)
            else:
                self.blocks.append((kind, data))
        return dict(section.metrics)

    def code(self, text: str, summary: str | None = None) -> None:
        self.blocks.append(("code", (text, summary)))

    # ------------------------------------------------------------------ rendering

    def to_markdown(self, image_dir: str = "images") -> tuple[str, dict[str, bytes]]:
        lines, images = [f"# {self.title}", ""], {}
        for kind, data in self.blocks:
            if kind == "heading":
                lines += [f"## {data}", ""]
            elif kind == "paragraph":
                lines += [data, ""]
            elif kind == "table":
                headers, rows = data
                esc = lambda v: format_value(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                lines.append("| " + " | ".join(esc(h) for h in headers) + " |")
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
                lines.append("")
            elif kind == "image":
                name, png, caption = data
                fname = f"{image_dir}/{name}.png"
                images[fname] = png
                lines += [f"![{caption}]({fname})", "", f"*{caption}*", ""]
            elif kind == "code":
                text, summary = data
                if summary:
                    lines += [f"<details><summary>{summary}</summary>", ""]
                lines += ["```yaml", text.rstrip(), "```", ""]
                if summary:
                    lines += ["</details>", ""]
        return "\n".join(lines), images

    def to_html(self) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
        ]
        for kind, data in self.blocks:
            if kind == "heading":
                out.append(f"<h2>{e(data)}</h2>")
            elif kind == "paragraph":
                out.append(f"<p>{e(data)}</p>")
            elif kind == "table":
                headers, rows = data
                out.append("<table>")
                if any(headers):
                    out.append(
                        "<thead><tr>"
                        + "".join(f"<th>{e(str(h))}</th>" for h in headers)
                        + "</tr></thead>"
                    )
                out.append("<tbody>")
                for r in rows:
                    cells = "".join(
                        f'<td class="num">{e(format_value(v))}</td>'
                        if isinstance(v, (int, float))
                        else f"<td>{e(format_value(v))}</td>"
                        for v in r
                    )
                    out.append(f"<tr>{cells}</tr>")
                out.append("</tbody></table>")
            elif kind == "image":
                name, png, caption = data
                b64 = base64.b64encode(png).decode("ascii")
                out.append(
                    f'<figure><img alt="{e(caption)}" data-name="{e(name)}" '
                    f'src="data:image/png;base64,{b64}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
            elif kind == "code":
                text, summary = data
                pre = f"<pre>{e(text)}</pre>"
                out.append(
                    f"<details><summary>{e(summary)}</summary>{pre}</details>" if summary else pre
                )
        out.append("</body></html>")
        return "\n".join(out)

    def write(
        self, out_dir: str | Path, metrics: dict[str, float] | None = None
    ) -> dict[str, Path]:
        """Write report.md (+ images/), report.html and, if given, metrics.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md, images = self.to_markdown()
        for rel, png in images.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(png)
        files = {"markdown": out / "report.md", "html": out / "report.html"}
        files["markdown"].write_text(md, encoding="utf-8")
        files["html"].write_text(self.to_html(), encoding="utf-8")
        if metrics is not None:
            files["metrics"] = out / "metrics.json"
            files["metrics"].write_text(
                json.dumps(metrics, indent=2, sort_keys=True), encoding="utf-8"
            )
        return files
