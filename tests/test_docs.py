"""The documentation site (docs/, mkdocs.yml) and the README front page.

Fast tier: every shell block in docs/ and README.md is marked as run or not run (with a reason),
the docs keep history to the Upgrading page, the generated config reference covers every key
in conf/, the tags the tracking reference names exist in the code, every family has a page.
Full tier: the strict build (``e2e``), every block marked ``<!-- run -->`` runs (``e2e``), and
the built pages render in headless chromium (``services``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF, ROOT, chromium, run_cli

DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
RUN = re.compile(r"^<!--\s*run\s*-->$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^`\s]*)")
# a placeholder in a runnable block: the id of a shared debug=fast run of the default experiment
RUN_ID = re.compile(r"<(run id|id|mlflow run id)>")
# the first run of the docs (get started, README): run once, as the shared run itself
SHARED_RUN = "python train.py debug=fast"
BUILD_LIMIT_S = 60  # the strict build's budget on 2 CPU cores


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # the HTML comment on the line before the fence

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the comment just before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match.group("fence"), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        before = lines[start - 1].strip() if start > 0 else ""
        marker = before if before.startswith("<!--") else None
        lang = match.group("info").lower().strip("{}.")
        blocks.append(Block(path, start + 1, lang, "\n".join(body), marker))
        i += 1
    return blocks


def shell_blocks() -> list[Block]:
    return [b for p in DOC_FILES for b in code_blocks(p) if b.lang in SHELL_LANGS]


def runnable_blocks() -> list[Block]:
    return [b for b in shell_blocks() if b.marker and RUN.match(b.marker)]


# ------------------------------------------------------------------------------- fast tier


def test_every_shell_block_is_run_or_says_why_not():
    """A shell block is preceded by ``<!-- run -->`` (a test runs it) or by
    ``<!-- not run: <reason> -->``; docs/reference/cli.md states the convention."""
    blocks = shell_blocks()
    assert len(blocks) > 30 and runnable_blocks()
    unmarked = [
        b.where
        for b in blocks
        if not b.marker
        or not (RUN.match(b.marker) or (NOT_RUN.match(b.marker) and NOT_RUN.match(b.marker)[1]))
    ]
    assert not unmarked, f"shell blocks without <!-- run --> or <!-- not run: why -->: {unmarked}"


def test_every_marker_precedes_a_shell_block():
    """A run marker in front of anything else (a yaml block, prose) would silently run nothing."""
    marked = {(b.path, b.line - 1) for b in shell_blocks() if b.marker}
    stray = []
    for path in DOC_FILES:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if RUN.match(line.strip()) or NOT_RUN.match(line.strip()):
                if (path, n) not in marked:
                    stray.append(f"{path.relative_to(ROOT)}:{n}")
    assert not stray, f"markers not directly before a shell block: {stray}"


HISTORY = re.compile(
    r"\b(until issue|issue \d+|issue #\d+|used to|no longer|earlier versions?|earlier jobs?|"
    r"as it ran before|before the cache|before this|previously|formerly|was changed|"
    r"now (?:uses|reads|writes)|'s measurement)\b",
    re.IGNORECASE,
)


def test_docs_say_what_the_code_does_now():
    """History (old issues, earlier versions, upgrade paths) belongs on the Upgrading page."""
    found = []
    for path in DOC_FILES:
        if path == DOCS / "upgrading.md":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in HISTORY.finditer(line):
                if match.group(0).lower() == "no longer" and "no longer fit" in line:
                    continue  # "when the model no longer fits": a condition, not history
                found.append(f"{path.relative_to(ROOT)}:{n}: {match.group(0)!r}")
    assert not found, found


def test_readme_is_a_short_front_page_with_the_ci_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text().split("--- the README's commands ---", 1)[1]
    commands = [line.strip() for line in ci.splitlines() if line.strip()]
    assert commands, ".ci/run lists no commands"
    for command in commands:  # `pytest --full --durations=25` is `pytest --full` in the README
        base = command.split(" --durations")[0]
        assert base in readme, f"README does not state .ci/run's command {base!r}"
    for page in ("eeg", "pix2pix", "sparsebert", "detection"):
        assert f"(docs/families/{page}.md)" in readme
    for command in ("mkdocs serve", "mkdocs build --strict"):
        assert command in readme


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def _mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may hold !ENV / !!python tags; none are needed to read the nav
    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_every_family_has_its_page_in_the_nav():
    """Each experiment's ``tags.family`` has docs/families/<family>.md, listed under Families."""
    families = set()
    for path in (CONF / "experiment").glob("*.yaml"):
        family = (yaml.safe_load(path.read_text()).get("tags") or {}).get("family")
        if family:  # an experiment built on another one inherits its family
            families.add(family)
    assert {"eeg", "pix2pix", "sparsebert", "detection"} <= families
    nav = _nav_pages(_mkdocs_config()["nav"])
    for family in sorted(families):
        page = f"families/{family}.md"
        assert (DOCS / page).is_file(), f"family {family!r} has no page docs/{page}"
        assert page in nav, f"docs/{page} is not in mkdocs.yml's nav"
    for page in nav:
        assert page.startswith("reference/config.md") or (DOCS / page).is_file(), page


def _leaf_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [k for key, v in node.items() for k in _leaf_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_the_config_reference_lists_every_group_option_and_key():
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import config_reference
    finally:
        sys.path.pop(0)
    page = config_reference.render()
    for path in sorted(CONF.rglob("*.yaml")):
        option = str(path.relative_to(CONF).with_suffix(""))
        assert f"### {option} " in page, option
        data = yaml.safe_load(path.read_text()) or {}
        section = page.split(f"### {option} ", 1)[1].split("\n### ", 1)[0]
        prefix = config_reference.package(path)
        for key in _leaf_keys({k: v for k, v in data.items() if k != "defaults"}):
            key = f"{prefix}.{key}" if prefix and key else key
            parts = key.split(".")  # a flow mapping ({a: 1, b: 2}) is one row, its parent key
            prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
            assert not key or any(f"| `{p}` |" in section for p in prefixes), (option, key)
    # a comment beside a key reaches the table
    assert "| `tracking.outage_wait` | `30` | at the end of a job" in page
    assert "| `model.mask.mode` | `dense` |" in page and "| `data.cache` | `beside` |" in page


def test_the_tags_the_tracking_reference_names_exist_in_the_code():
    text = (DOCS / "reference" / "tracking.md").read_text(encoding="utf-8")
    tags = set(re.findall(r"`(zoo\.[a-z_.]+)`", text))
    assert {"zoo.kind", "zoo.failure", "zoo.model_uri"} <= tags
    sources = [*(ROOT / "zoo").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]
    code = "\n".join(p.read_text(encoding="utf-8") for p in sources)
    conf = "\n".join(p.read_text() for p in CONF.rglob("*.yaml"))
    modules = {"zoo.tracking.delivery", "zoo.tracking.open_store", "zoo.studies.cv", "zoo.export"}
    assert 'f"zoo.tag.{k}"' in code  # zoo.tag.<key>: each entry of the config's tags
    missing = [
        t
        for t in sorted(tags - modules)
        if t not in code
        and not (t.startswith("zoo.tag.") and re.search(rf"\b{t[8:]}\b", code + conf))
    ]
    assert not missing, f"tags in reference/tracking.md that no code sets: {missing}"


def test_the_api_reference_names_real_modules_and_the_images_exist():
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for module in re.findall(r"^::: ([\w.]+)", text, re.MULTILINE):
            assert importlib.util.find_spec(module) is not None, f"{path}: {module}"
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert (path.parent / image).resolve().is_file(), f"{path}: {image}"


# ------------------------------------------------------------------------------- full tier


def _shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder shared by the xdist workers of this session (their base temp's parent)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    path.mkdir(exist_ok=True)
    return path


def _once(folder: Path, make) -> str:
    """``make()``'s result, computed by one process of the session and read by the others."""
    from zoo.data.cache import file_lock

    done = folder / "result"
    with file_lock(folder / ".lock"):
        if not done.exists():
            done.write_text(make())
    return done.read_text()


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    """The site as ``mkdocs build --strict`` builds it (once per session)."""
    folder = _shared_dir(tmp_path_factory, "docs-site")

    def build() -> str:
        site = folder / "site"
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
            cwd=ROOT,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds = time.monotonic() - start
        (folder / "log").write_text(proc.stdout + proc.stderr)
        return f"{proc.returncode} {seconds:.1f} {site}"

    code, seconds, site = _once(folder, build).split(" ", 2)
    if code != "0":
        pytest.fail(f"mkdocs build --strict failed:\n{(folder / 'log').read_text()[-5000:]}")
    return Path(site)


@pytest.mark.e2e
def test_the_site_builds_strictly_within_its_budget(built_site, tmp_path_factory):
    """A broken link, a page missing from the nav, a failed API reference or a bad config
    reference fails ``--strict``; the build must also stay within a minute."""
    code, seconds, _ = (
        (_shared_dir(tmp_path_factory, "docs-site") / "result").read_text().split(" ", 2)
    )
    print(f"mkdocs build --strict: {seconds} s")
    assert float(seconds) <= BUILD_LIMIT_S, f"the strict build took {seconds} s"
    config = (built_site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    assert "tracking.outage_wait" in config and "data.cache_verify" in config
    api = (built_site / "reference" / "api" / "kernels" / "index.html").read_text(encoding="utf-8")
    assert "masked_attention" in api and "set_backend" in api
    for page in ("families/eeg", "troubleshooting", "upgrading", "how-to/own-data"):
        assert (built_site / page / "index.html").is_file(), page
    # the site's search finds a config key, an error message and a family's real-data command
    index = json.loads((built_site / "search" / "search_index.json").read_text(encoding="utf-8"))
    text = " ".join(doc["text"] + " " + doc["title"] for doc in index["docs"])
    for wanted in (
        "model.mask.mode",
        "is not in struct",
        "is not an option of",
        "data.data_dir=/data/DEAP/data_preprocessed_python",
    ):
        assert wanted in text, f"the search index lacks {wanted!r}"


def _shared_run(tmp_path_factory) -> tuple[str, Path]:
    """One ``train.py debug=fast`` run of the default experiment, in a store and data folder the
    runnable blocks share; returns its run id and the folder."""
    folder = _shared_dir(tmp_path_factory, "docs-commands")

    def train() -> str:
        proc = run_cli("train.py", SHARED_RUN.split()[2:], folder, _env(folder), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return re.search(r"mlflow run id\s*:\s*(\w+)", proc.stdout + proc.stderr).group(1)

    return _once(folder, train), folder


def _env(shared: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_MKDOCS_2_WARNING": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{shared / 'mlflow.db'}"
    env["ZOO_DATA_DIR"] = str(shared / "data")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.e2e
@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.where)
def test_a_runnable_block_runs(block, tmp_path, tmp_path_factory):
    """Each ``<!-- run -->`` block, as a user types it: in a fresh working directory holding the
    entry points (``data/`` and the mlflow store shared with the other blocks), ``<run id>``
    standing for a shared debug=fast run."""
    code = block.code
    if code.split("#")[0].strip() == SHARED_RUN:
        assert _shared_run(tmp_path_factory)[0]  # the same command: trained once per session
        return
    shared = _shared_dir(tmp_path_factory, "docs-commands")
    if RUN_ID.search(code):
        run_id, shared = _shared_run(tmp_path_factory)
        code = RUN_ID.sub(run_id, code)
    for name in ("train.py", "evaluate.py", "predict.py", "conf", "mkdocs.yml", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    (shared / "data").mkdir(exist_ok=True)
    (tmp_path / "data").symlink_to(shared / "data")
    env = _env(shared)
    env["ZOO_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"{block.where}:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _screenshot(driver, url: str, png: Path) -> dict:
    driver.get(url)
    page = {
        "title": driver.title,
        "h1": driver.execute_script("return document.querySelector('h1')?.textContent || ''"),
        "nav": driver.execute_script(
            "return Array.from(document.querySelectorAll('.md-nav__link'))"
            ".map(e => e.textContent.trim())"
        ),
        "images": driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])"
        ),
    }
    driver.save_screenshot(str(png))
    return page


@pytest.mark.services
def test_the_home_page_and_a_family_page_render_in_chromium(built_site, tmp_path):
    """The built pages open in headless chromium with their title, navigation, headings and
    figures; the screenshots are kept (their paths are printed, and copied to
    $ZOO_DOCS_SCREENSHOTS when it is set)."""
    from PIL import Image

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with chromium(tmp_path / "profile", window="1280,1000") as driver:
        home = _screenshot(driver, (built_site / "index.html").as_uri(), shots / "home.png")
        family = _screenshot(
            driver,
            (built_site / "families" / "sparsebert" / "index.html").as_uri(),
            shots / "family-sparsebert.png",
        )
    assert home["title"].startswith("zoo") and home["h1"].strip().startswith("zoo")
    for entry in ("Get started", "How-to guides", "Families", "Reference", "Troubleshooting"):
        assert entry in home["nav"], (entry, home["nav"])
    assert family["h1"].startswith("SparseBERT") and "SparseBERT" in family["title"]
    assert family["images"] and all(ok and width > 0 for ok, width in family["images"])
    for png in (shots / "home.png", shots / "family-sparsebert.png"):
        with Image.open(png) as image:
            colours = image.convert("L").resize((64, 64)).getcolors(4096) or []
            assert image.size[0] >= 1000 and len(colours) > 8, (png, image.size)
        assert png.stat().st_size > 20_000, png
        print(f"screenshot: {png}")
    if os.environ.get("ZOO_DOCS_SCREENSHOTS"):
        target = Path(os.environ["ZOO_DOCS_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        for png in shots.glob("*.png"):
            shutil.copy(png, target / png.name)
