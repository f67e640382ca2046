"""Report rendering: Markdown + self-contained HTML, checked in a real headless browser."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import render_in_chromium
from zoo.plotting import confusion_matrix_figure
from zoo.reports import Report
from zoo.reports.classification import per_class_metrics


def _report() -> Report:
    r = Report("Demo <report>")
    r.key_values({"run": "abc|def"})
    r.heading("Metrics")
    r.table(["metric", "value"], [["test/acc", 0.5], ["test/loss", 1.25]])
    r.image(
        confusion_matrix_figure(np.array([[5, 1], [2, 7]]), ["a", "b"]), "confusion matrix", "cm"
    )
    r.code("a: 1\n", "config")
    return r


def test_markdown_and_html(tmp_path):
    files = _report().write(tmp_path, {"test/acc": 0.5})
    md = files["markdown"].read_text()
    assert (
        "| test/acc | 0.5000 |" in md
        and "abc\\|def" in md
        and "![confusion matrix](images/cm.png)" in md
    )
    assert (tmp_path / "images" / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = files["html"].read_text()
    assert "Demo &lt;report&gt;" in html and "<details><summary>config</summary>" in html
    assert html.count("data:image/png;base64,") == 1 and 'src="images/' not in html
    assert files["metrics"].read_text().strip().startswith("{")


def test_per_class_metrics_by_hand():
    cm = np.array([[5, 1], [2, 7]])  # rows: true, cols: predicted
    m = per_class_metrics(cm, ["a", "b"])
    assert m["a"]["precision"] == pytest.approx(5 / 7) and m["a"]["recall"] == pytest.approx(5 / 6)
    assert (
        m["b"]["f1"] == pytest.approx(2 * (7 / 8) * (7 / 9) / (7 / 8 + 7 / 9))
        and m["b"]["support"] == 9
    )
    empty = per_class_metrics(np.zeros((2, 2)), ["a", "b"])
    assert empty["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


@pytest.mark.services
def test_html_report_renders_in_headless_chromium(tmp_path):
    files = _report().write(tmp_path)
    page = render_in_chromium(files["html"], tmp_path / "profile")
    assert page["title"] == "Demo <report>"
    assert page["images"] and all(ok and w > 100 and h > 100 for ok, w, h in page["images"]), page
    assert page["table_rows"] >= 4
    assert page["external_requests"] == []  # self-contained: no request other than for itself


def test_report_macro_f1_matches_torchmetrics():
    import torch
    from torchmetrics.functional.classification import multiclass_f1_score

    from zoo.reports.classification import classification_sections

    target = torch.tensor([1, 1, 1, 2, 2, 3, 3, 3, 3])  # class 0 never appears nor is predicted
    preds = torch.tensor([1, 3, 1, 3, 2, 3, 1, 3, 3])
    cm = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(target, preds):
        cm[t, p] += 1
    report = Report("r")
    sections = classification_sections(cm, ["a", "b", "c", "d"])
    flat = {}
    for section in sections:
        flat.update(report.add(section))
    assert flat["test/f1/b"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))  # P = R = 2/3
    assert any(kind == "image" for kind, _ in report.blocks)
    table = next(data for kind, data in report.blocks if kind == "table")
    macro_f1 = table[1][-1][3]
    assert macro_f1 == pytest.approx(multiclass_f1_score(preds, target, 4, average="macro").item())
