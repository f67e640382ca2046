"""Shared fixtures: composed configs pointing at a per-session demo dataset and mlflow store."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import zoo.config  # noqa: F401  (resolvers)
from zoo.cli import prepare

# Triton kernels run on CPU tensors in Triton's interpreter where no GPU is present (the
# variable must be set before zoo.kernels.triton is first imported); on a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
_COUNTER = itertools.count()
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


# the real-process tiers: left out of a plain `pytest`, run by `pytest --full` (and .ci/run)
TIERS = {
    "e2e": "runs train.py / evaluate.py / a study as a CLI subprocess",
    "multiprocess": "several cooperating processes: DDP, tensor parallelism, torchrun, spawn",
    "services": "a real mlflow server, PostgreSQL or headless chromium",
    "faults": "kills, signals and outages of real processes",
}


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help=f"also run the real-process tiers ({', '.join(TIERS)}); a plain run leaves them out",
    )


def pytest_configure(config):
    for name, what in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {what} (run with --full)")


def pytest_collection_modifyitems(config, items):
    """A plain run keeps the fast tier: tests with a tier marker are deselected unless --full
    or an explicit -m chooses. Tests marked ``waits`` go first: under xdist their waiting then
    overlaps the CPU-bound tests instead of ending the run on one busy worker. The others keep
    their file order, which mixes the multi-process tests with in-process ones (sorted longest
    first, two multi-process tests ran at once and the full tier took longer: 25:54)."""
    if not config.getoption("--full") and not config.getoption("markexpr"):
        fast = [item for item in items if not any(item.get_closest_marker(t) for t in TIERS)]
        if len(fast) < len(items):
            config.hook.pytest_deselected(items=[i for i in items if i not in fast])
            items[:] = fast
    items.sort(key=lambda item: item.get_closest_marker("waits") is None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One demo data folder for the whole session (generated once, on first use)."""
    path = tmp_path_factory.mktemp("zoo-data")
    os.environ["ZOO_DATA_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An mlflow sqlite store with its schema made (one per pytest worker). A new store's
    first process spends seconds creating and migrating the schema; the tests that are not
    about that start from a copy (``sqlite_uri``), those that are use a new file."""
    folder = tmp_path_factory.mktemp("store-template")
    path = folder / "mlflow.db"
    subprocess.run(
        [sys.executable, "-c", f"import mlflow; mlflow.MlflowClient('sqlite:///{path}')"],
        cwd=folder,  # the Default experiment's artifact folder: never used
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture
def sqlite_uri(tmp_path, store_template) -> str:
    """A store of the test's own, ``<tmp_path>/mlflow.db``, copied from ``store_template``."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(store_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def compose_cfg(
    config_name: str, overrides: list[str], out: Path, data_dir: Path, tracking_uri: str
) -> DictConfig:
    """Compose like the command line would, with paths and mlflow store under the test's dirs."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.root_dir = str(out)
            cfg.paths.data_dir = str(data_dir)
            cfg.paths.log_dir = str(out / "logs")
            if not any(o.startswith("paths.output_dir=") for o in overrides):
                cfg.paths.output_dir = str(out / f"output-{next(_COUNTER)}")
            cfg.tracking.tracking_uri = tracking_uri
        prepare(cfg)
    return cfg


def artifacts(client, run_id: str, path: str = "") -> set[str]:
    """Every artifact path of an mlflow run (recursively)."""
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def build_model(overrides: list[str], **kwargs):
    """The Lightning module a train config composes to: every default comes from conf/
    (``kwargs`` replace arguments of the model node, e.g. ``sources=``)."""
    import tempfile

    from zoo.pipeline import build

    tmp = Path(tempfile.mkdtemp(prefix="zoo-model-"))
    cfg = compose_cfg("train", list(overrides), tmp, tmp, f"sqlite:///{tmp}/mlflow.db")
    GlobalHydra.instance().clear()
    return build(cfg.model, "model", **kwargs)


@pytest.fixture
def make_cfg(tmp_path, data_dir, tracking_uri):
    def _make(overrides: list[str] = (), config_name: str = "train") -> DictConfig:
        return compose_cfg(config_name, list(overrides), tmp_path, data_dir, tracking_uri)

    yield _make
    GlobalHydra.instance().clear()


def cli_env(env_extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(
    script: str, args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 300
):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=cli_env(env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def failure_text(proc, tail: int = 3000) -> str:
    """What a failed CLI run says: the end of its stdout and stderr, plus every traceback in
    stderr (a multi-process job prints one per rank, and the first is often the cause)."""
    err = proc.stderr or ""
    tracebacks = [err[m.start() : m.start() + 4000] for m in re.finditer("Traceback", err)]
    early = [t for t in tracebacks if err.find(t) < len(err) - tail]
    return "\n".join([(proc.stdout or "")[-2000:], *early, err[-tail:]])


def start_cli(script: str, args: list[str], cwd: Path, env_extra: dict | None = None):
    """run_cli without waiting: the process, with stdout/stderr pipes (use communicate())."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=cli_env(env_extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(
    folder: Path,
    port: int,
    backend: str | None = None,
    extra_args: tuple[str, ...] = (),
    env: dict | None = None,
) -> subprocess.Popen:
    """A real ``mlflow server`` on loopback (sqlite store unless ``backend`` is given, artifacts
    under ``folder``), in its own process group; returns once it answers (its start takes
    ~10-20 s here, more on a new PostgreSQL database: mlflow migrates its schema)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend or f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "server-artifacts"),
            *extra_args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "w"),  # the server owns it
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                return proc
        except OSError:
            time.sleep(0.25)
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(folder / 'server.log').read_text()[-3000:]}")
    stop_mlflow_server(proc)
    pytest.fail("mlflow server did not start within 120 s")


def stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server from start_mlflow_server and its workers (SIGKILL: a crash)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real ``mlflow server`` for the session. Tests keep apart by experiment name."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}", tmp_path / "server-artifacts"
    finally:
        stop_mlflow_server(proc)


def _postgres_bin() -> Path | None:
    """Debian keeps PostgreSQL's server programs off PATH, in /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts)
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on loopback (Debian's package: .ci/run installs it and sets
    ZOO_REQUIRE_POSTGRES=1, so CI fails rather than skips without it). Yields a function that
    creates a database and returns its URL (user ``zoo``, password authentication over TCP)."""
    import pwd
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        if os.environ.get("ZOO_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL not found but ZOO_REQUIRE_POSTGRES=1")
        pytest.skip("needs Debian's postgresql (apt-get install postgresql)")
    prefix: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="zoo-pg-"))  # not under pytest's 0700 tmp: the
    password = "zoo-test-password"  # server's user must reach it
    (folder / "pw").write_text(password + "\n")
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as Debian's postgres user
        user = pwd.getpwnam("postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
        for path in (folder, folder / "pw"):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = free_port()
    data = folder / "data"

    def pg(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True)

    try:
        pg(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "zoo",
            f"--pwfile={folder / 'pw'}",
            "-A",
            "scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "log"),
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off",
            "start",
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr or exc.stdout}")
    base = f"postgresql://zoo:{password}@127.0.0.1:{port}"

    def create_database(name: str) -> str:
        import psycopg

        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{base}/{name}"

    try:
        yield create_database
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@contextmanager
def chromium(profile_dir: Path, window: str = "1400,1000"):
    """A headless Debian chromium driven by selenium (skips where it is not installed, fails
    instead under ZOO_REQUIRE_BROWSER=1, which .ci/run sets)."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("ZOO_REQUIRE_BROWSER") == "1":  # set by .ci/run, which installs them
            pytest.fail("chromium/chromedriver not found but ZOO_REQUIRE_BROWSER=1")
        pytest.skip(
            "needs Debian's chromium + chromium-driver (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--window-size={window}",
        f"--user-data-dir={profile_dir}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def render_in_chromium(html: Path, profile_dir: Path) -> dict:
    """Open an HTML report in headless chromium; returns its title, every image's (loaded,
    width, height), the number of table rows and requests other than data: URLs."""
    with chromium(profile_dir) as driver:
        driver.get(Path(html).as_uri())
        images = (
            "return Array.from(document.images)"
            ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        resources = "return performance.getEntriesByType('resource').map(e => e.name)"
        return {
            "title": driver.title,
            "images": driver.execute_script(images),
            "table_rows": driver.execute_script(
                "return document.querySelectorAll('table tr').length"
            ),
            "external_requests": [
                u for u in driver.execute_script(resources) if not u.startswith("data:")
            ],
        }


def pycocotools_eval(gt: dict, results: list[dict]):
    """pycocotools' COCOeval (bbox) of COCO dicts: the reference our COCO metrics must equal."""
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))  # pycocotools adds keys to what it is given
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev
