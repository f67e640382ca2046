"""Using a trained model on raw inputs: the preprocessing a model carries, its answers to what a
user holds (a DEAP trial, sentences, a photo), bad input, ``predict.py``, and the served REST
endpoint, for every family.

The fast tests build each family's model with its data module's preprocessing (no training);
the end-to-end test takes each family's run trained at ``debug=fast`` through every path the
docs (Predict, Serve and export) document: the logged model through ``mlflow.pyfunc`` in each
input form a user holds, ``predict.py`` and ``mlflow models serve`` (the same answers to the
same raw files), and ``python -m zoo.export`` in both formats.
"""

from __future__ import annotations

import json
import pickle
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import cli_env, failure_text, free_port, run_cli
from zoo.errors import DataError
from zoo.inference import predict_path, respond
from zoo.pipeline import build

FAMILIES = {
    "eeg": "eeg_cnn_lstm",
    "sparsebert": "sparsebert_dense_demo",
    "pix2pix": "pix2pix_demo",
    "detection": "detection_groupsoftmax_demo",
}
EEG_SAMPLES = 384 + 10 * 128  # DEAP's 3 s baseline and 10 s of trial


def photo(name: str, height: int, width: int) -> np.ndarray:
    """A real photograph from scikit-image's data, cut to an odd size, uint8 (H, W, 3)."""
    from zoo.data.demo.pix2pix import load_photo

    return load_photo(name)[:height, :width].copy()


def deap_trials(n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``n`` generated DEAP trials (40 channels, 128 Hz, with the baseline) and their ratings."""
    from zoo.data.demo.deap import make_subject

    subject = make_subject(7, seed=3, n_trials=n)
    return subject["data"][:, :, :EEG_SAMPLES], subject["labels"]


PAIRS = [
    ("The sort method orders a list in place.", "It returns None to remind you of that."),
    ("A generator yields values lazily.", "Tuples are immutable sequences."),
    ("Dictionaries map keys to values.", "Keys must be hashable."),
]


def write_raw_inputs(family: str, folder: Path) -> list:
    """Raw input files for ``family`` in ``folder`` (read by predict.py in name order) and the
    same inputs as Python values, in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    if family == "eeg":
        data, ratings = deap_trials()
        with (folder / "s07.dat").open("wb") as f:  # DEAP's format: a Python 2 pickle
            pickle.dump({"data": data, "labels": ratings}, f, protocol=2)
        return list(data.astype(np.float32))
    if family == "sparsebert":
        lines = [f"{a}\t{b}" for a, b in PAIRS]
        (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
        return PAIRS
    from PIL import Image

    from zoo.data.demo.pix2pix import make_input

    images = [photo("astronaut", 97, 75), photo("coffee", 64, 90)]
    if family == "pix2pix":  # the model's input domain: edges of a real photo
        images[1] = make_input(images[1], "edges")
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return images


def prepared(family: str, make_cfg):
    """(model with its data module's preprocessing, data module, config): untrained."""
    cfg = make_cfg([f"experiment={FAMILIES[family]}"])
    dm = build(cfg.data, "data")
    dm.prepare_data()
    torch.manual_seed(0)
    module = build(cfg.model, "model")
    module.preprocessing = dm.preprocessing_spec()
    return module.eval(), dm, cfg


def comparable(family: str, answer) -> object:
    """An answer (pyfunc output, or a served JSON's predictions) in one comparable form."""
    if family == "pix2pix":
        return [np.asarray(a, dtype=np.uint8) for a in answer]
    frame = pd.DataFrame.from_records(answer) if isinstance(answer, list) else answer
    return frame.reset_index(drop=True)


def assert_same(family: str, a, b) -> None:
    if family == "pix2pix":
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.shape == y.shape and np.abs(x.astype(int) - y.astype(int)).max() <= 1
        return
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        if a[column].dtype.kind == "f" or b[column].dtype.kind == "f":
            np.testing.assert_allclose(
                a[column], b[column], atol=2e-2 if family == "detection" else 1e-4
            )
        else:
            assert a[column].tolist() == b[column].tolist(), column


# --------------------------------------------------------------------------- fast tier


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_preprocessing_travels_in_the_state_dict(make_cfg, tmp_path, family):
    module, _, cfg = prepared(family, make_cfg)
    assert module.preprocessing
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    fresh = build(cfg.model, "model")
    assert not fresh.preprocessing
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert fresh.preprocessing == module.preprocessing
    # a state dict from before the preprocessing travelled still loads (with none)
    old = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    again = build(cfg.model, "model")
    again.load_state_dict(old)
    assert not again.preprocessing
    with pytest.raises(DataError, match="carries no preprocessing"):
        again.raw_inputs()


def test_eeg_answers_raw_trials_per_trial_from_its_windows(make_cfg):
    module, _, _ = prepared("eeg", make_cfg)
    raw = module.raw_inputs()
    data, _ = deap_trials(3)
    frame = respond(module, data.astype(np.float32))
    names = module.class_names
    assert list(frame.columns) == [
        "prediction",
        "windows",
        *[f"prob_{c}" for c in names],
        *[f"votes_{c}" for c in names],
    ]
    assert len(frame) == 3 and (frame.windows == 9).all()  # 10 s: 2 s windows, 1 s step
    probs = frame[[f"prob_{c}" for c in names]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (frame[[f"votes_{c}" for c in names]].sum(1) == 9).all()
    # one trial (channels, samples), or only the model's channels: the same answer
    one = respond(module, data[1])
    pd.testing.assert_frame_equal(one, frame.iloc[[1]].reset_index(drop=True), atol=1e-6)
    mine = data[1][raw.channel_idx]
    pd.testing.assert_frame_equal(respond(module, mine), one, atol=1e-6)
    # the network's own input (windows) is still answered by serve: per-window probabilities
    windows = raw.network_input([data[0]])
    per_window = respond(module, windows)
    assert per_window.shape == (9, len(names))
    np.testing.assert_allclose(per_window.mean(0), probs[0], atol=1e-5)


def test_sparsebert_answers_text_pairs_in_every_form(make_cfg):
    module, _, _ = prepared("sparsebert", make_cfg)
    frame = respond(module, pd.DataFrame(PAIRS, columns=["text", "text_pair"]))
    assert list(frame.columns) == ["prediction", *[f"prob_{c}" for c in module.class_names]]
    for form in (
        [list(p) for p in PAIRS],
        {"text": [a for a, _ in PAIRS], "text_pair": [b for _, b in PAIRS]},
        pd.DataFrame(PAIRS, columns=["sentence1", "sentence2"]),  # the task's own columns
    ):
        pd.testing.assert_frame_equal(respond(module, form), frame)
    # the network's input from the same texts: the same probabilities through serve
    raw = module.raw_inputs()
    probs = respond(module, raw.network_input(list(PAIRS)))
    np.testing.assert_allclose(probs, frame.iloc[:, 1:].to_numpy(), atol=1e-5)
    # truncation to the trained max_length
    long = [(" ".join(["word"] * 2000), "short")]
    assert raw.network_input(long)["input_ids"].shape[1] == module.preprocessing["max_length"]


@pytest.mark.parametrize("family", ["pix2pix", "detection"])
def test_image_models_answer_photos_of_any_size(make_cfg, family):
    module, _, _ = prepared(family, make_cfg)
    images = [photo("astronaut", 97, 75), photo("chelsea", 50, 130)]
    answer = respond(module, images)
    if family == "pix2pix":  # translated images of the inputs' sizes
        assert [a.shape for a in answer] == [i.shape for i in images]
        assert all(a.dtype == np.uint8 for a in answer)
        same = respond(module, images[0][None])  # a batch (B, H, W, 3)
        assert same.shape == (1, 97, 75, 3) and np.array_equal(same[0], answer[0])
        grey = respond(module, images[0].mean(-1).astype(np.uint8))
        assert grey.shape == (1, 97, 75, 3)
    else:
        assert list(answer.columns) == ["image", "label", "class", "score", "x1", "y1", "x2", "y2"]
        assert set(answer.image) <= {0, 1}
        for i, image in enumerate(images):  # boxes in the pixels of their own image
            boxes = answer[answer.image == i]
            assert (boxes.x2 <= image.shape[1] + 1e-3).all() and (
                boxes.y2 <= image.shape[0] + 1e-3
            ).all()


BAD_INPUTS = [
    ("eeg", np.zeros((7, 2000), np.float32), "got shape (7, 2000)"),
    ("eeg", np.zeros((40, 500), np.float32), "500 samples is too few"),
    ("eeg", [np.zeros((40, 1000)), "a sentence"], "mixed kinds"),
    ("eeg", np.full((40, 1000), np.nan), "NaN"),
    ("sparsebert", pd.DataFrame({"text": ["fine"], "text_pair": ["  "]}), "an empty text"),
    ("sparsebert", ["one text, but the task takes pairs"], "takes a (text, text_pair) pair"),
    ("sparsebert", [("a", "b"), np.zeros((4, 4))], "mixed kinds"),
    ("pix2pix", ["a sentence"], "mixed kinds"),
    ("pix2pix", [np.full((8, 8, 3), 300.0)], "0..255 (uint8) or 0..1 (float)"),
    ("pix2pix", [np.full((8, 8, 3), -1)], "values from -1 to -1"),
    ("pix2pix", [np.full((8, 8, 3), np.nan)], "NaN"),
    ("detection", [np.zeros((8,), np.uint8)], "(height, width, 3) uint8 array"),
]


@pytest.mark.parametrize(("family", "value", "message"), BAD_INPUTS)
def test_bad_raw_input_is_one_paragraph_naming_the_field(make_cfg, family, value, message):
    module, _, _ = prepared(family, make_cfg)
    with pytest.raises(DataError, match="inputs") as caught:
        respond(module, value)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_predict_path_reads_a_folder_skipping_bad_files(make_cfg, tmp_path, family):
    module, _, _ = prepared(family, make_cfg)
    raw = module.raw_inputs()
    folder = tmp_path / "in"
    values = write_raw_inputs(family, folder)
    bad = {"eeg": "broken.dat", "sparsebert": "broken.tsv", "pix2pix": "broken.png"}
    bad_name = bad.get(family, "broken.jpg")
    (folder / bad_name).write_bytes(b"\x00\x01 not a file of this kind")
    (folder / "notes.md").write_text("not an input")
    done = predict_path(raw, folder, tmp_path / "out", batch_size=2, progress=False)
    assert done.items == len(values)
    assert sorted(s.name for s in done.skipped) == sorted([bad_name, "notes.md"])
    assert "skipped.tsv" in {p.name for p in done.written}
    # one bad file given alone is an error naming it
    with pytest.raises(DataError, match=bad_name):
        predict_path(raw, folder / bad_name, tmp_path / "out2", batch_size=2, progress=False)
    with pytest.raises(DataError, match="notes.md"):
        predict_path(raw, folder / "notes.md", tmp_path / "out3", batch_size=2, progress=False)


def test_text_files_skip_empty_lines_and_keep_the_rest(make_cfg, tmp_path):
    module, _, _ = prepared("sparsebert", make_cfg)
    path = tmp_path / "pairs.txt"
    path.write_text("first\tsecond\n\nonly one\nthird\tfourth\n")
    done = predict_path(module.raw_inputs(), path, tmp_path / "out", batch_size=8, progress=False)
    assert done.items == 2
    assert [(s.name, s.reason) for s in done.skipped] == [
        ("pairs.txt:2", "an empty text"),
        ("pairs.txt:3", "this pydoc_continuity model takes a (text, text_pair) pair, got 1 texts"),
    ]
    table = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert table.line.tolist() == [1, 4] and table.text.tolist() == ["first", "third"]


# --------------------------------------------------------------------------- end to end


def _served(port: int, payload: dict) -> tuple[int, dict, float]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), time.perf_counter() - started


def pyfunc_forms(family: str, values: list) -> dict[str, tuple[object, list[int]]]:
    """The input forms the docs (Predict) give for the logged model's ``predict``, each with the
    indices of ``values`` it holds (EEG trials as a DEAP file holds them, float64)."""
    if family == "eeg":
        trials = np.stack(values).astype(np.float64)
        return {
            "float64 batch": (trials, [0, 1]),
            "float32 batch": (trials.astype(np.float32), [0, 1]),
            "list of trials": (list(trials), [0, 1]),
            "one trial": (trials[1], [1]),
        }
    if family == "sparsebert":
        return {
            "DataFrame": (pd.DataFrame(values, columns=["text", "text_pair"]), [0, 1, 2]),
            "dict of columns": (
                {"text": [a for a, _ in values], "text_pair": [b for _, b in values]},
                [0, 1, 2],
            ),
            "list of pairs": ([list(v) for v in values], [0, 1, 2]),
            "one pair": (tuple(values[2]), [2]),
        }
    ragged = np.empty(len(values), dtype=object)  # mlflow's form for images of two sizes
    ragged[:] = values
    return {
        "one image": (values[0], [0]),
        "batch of one": (values[1][None], [1]),
        "float image in [0, 1]": (values[0] / 255.0, [0]),
        "list of images": (list(values), [0, 1]),
        "ragged array": (ragged, [0, 1]),
    }


def _one(family: str, value):
    return pd.DataFrame([value], columns=["text", "text_pair"]) if family == "sparsebert" else value


def _one_answer(family: str, answer):
    return answer[0] if family == "pix2pix" else answer


def _split(family: str, answer, n: int) -> list:
    """A pyfunc answer to ``n`` values, one per value."""
    if family == "pix2pix":
        assert len(answer) == n
        return list(answer)
    if family == "detection":
        assert set(answer.image) <= set(range(n))
        return [answer[answer.image == i].assign(image=0) for i in range(n)]
    assert len(answer) == n
    return [answer.iloc[[i]] for i in range(n)]


def _joined(family: str, answers: list):
    """Answers to one value each, as one answer to all of them (comparable)."""
    if family == "pix2pix":
        return comparable(family, answers)
    if family == "detection":
        frames = [a.assign(image=i) for i, a in enumerate(answers)]
        return comparable(family, pd.concat(frames)).drop(columns=["class"])
    return comparable(family, pd.concat(answers))


def _payload(family: str, values: list) -> dict:
    if family == "sparsebert":
        return {"inputs": {"text": [a for a, _ in values], "text_pair": [b for _, b in values]}}
    return {"inputs": [np.asarray(v).tolist() for v in values]}


def _from_predict_py(family: str, out: Path, values: list):
    if family == "eeg":
        frame = pd.read_csv(out / "predictions.csv")
        return frame.drop(columns=["file", "trial", "label"])
    if family == "sparsebert":
        frame = pd.read_csv(out / "predictions.tsv", sep="\t")
        return frame.drop(columns=["file", "line", "text", "text_pair"])
    if family == "pix2pix":
        from PIL import Image

        return [np.asarray(Image.open(out / f"{i}.png")) for i in range(len(values))]
    results = json.loads((out / "detections.json").read_text())
    rows = [
        {
            "image": r["image_id"] - 1,
            "label": r["category_id"],
            "score": r["score"],
            "x1": r["bbox"][0],
            "y1": r["bbox"][1],
            "x2": r["bbox"][0] + r["bbox"][2],
            "y2": r["bbox"][1] + r["bbox"][3],
        }
        for r in results
    ]
    return pd.DataFrame(rows, columns=["image", "label", "score", "x1", "y1", "x2", "y2"])


def _start_server(model_uri: str, tracking_uri: str, cwd: Path):
    import subprocess
    import sys

    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = (cwd / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        cwd=cwd,
        env=cli_env({"MLFLOW_TRACKING_URI": tracking_uri}),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited:\n{(cwd / 'serve.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"mlflow models serve did not start:\n{(cwd / 'serve.log').read_text()}")


BAD_REQUESTS = {
    "eeg": ({"inputs": np.zeros((1, 40, 100)).tolist()}, "100 samples is too few"),
    "sparsebert": ({"inputs": {"text": ["fine"], "text_pair": [""]}}, "an empty text"),
    "pix2pix": ({"inputs": [[[[300, 0, 0]]]]}, ""),  # mlflow's own schema check answers
    "detection": ({"inputs": ["a sentence"]}, ""),
}


@pytest.mark.e2e
@pytest.mark.services
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_trained_model_through_every_documented_path(
    make_cfg, tracking_uri, tmp_path, monkeypatch, family
):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from tests.test_experiments import upstream_run
    from zoo import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    run_id = upstream_run(make_cfg, tracking_uri, FAMILIES[family])
    model_uri = MlflowClient(tracking_uri).get_run(run_id).data.tags[tracking.TAG_MODEL_URI]
    values = write_raw_inputs(family, tmp_path / "in")

    # 1. the logged model through mlflow.pyfunc, in every documented input form (a models:/
    # URI resolves through mlflow's global tracking URI, which an earlier test in this process
    # may have set)
    with tracking.global_tracking_uri(tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    # one value at a time: the answer each form must give for the values it holds (detection
    # pads a batch's images to one size, which moves boxes by float rounding)
    alone = [_one_answer(family, pyfunc.predict(_one(family, v))) for v in values]
    for form, (model_input, held) in pyfunc_forms(family, values).items():
        answers = _split(family, pyfunc.predict(model_input), len(held))
        for answer, i in zip(answers, held):
            if family == "detection" and len(held) > 1:  # a padded batch: the same boxes, near
                assert list(answer.columns) == list(alone[i].columns), form
            else:
                assert_same(family, comparable(family, answer), comparable(family, alone[i]))
    by_pyfunc = _joined(family, alone)

    # 2. predict.py on the files, as a user runs it
    out = tmp_path / "out"
    args = [f"model_uri={model_uri}", f"input={tmp_path / 'in'}", f"output={out}"]
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "ZOO_DATA_DIR": str(tmp_path / "data")}
    proc = run_cli("predict.py", args + ["batch_size=1"], tmp_path, env)
    assert proc.returncode == 0, failure_text(proc)
    assert f"predicted {len(values)} " in proc.stdout and "0 skipped" in proc.stdout
    by_cli = _from_predict_py(family, out, values)
    assert_same(family, by_cli, by_pyfunc)

    # bad input: a file of the wrong format is exit 2 and one paragraph naming it
    (tmp_path / "wrong.xyz").write_text("?")
    proc = run_cli("predict.py", [*args[:1], f"input={tmp_path / 'wrong.xyz'}"], tmp_path, env)
    assert proc.returncode == 2 and "wrong.xyz" in proc.stderr and "Traceback" not in proc.stderr

    # 3. the served endpoint, in a real `mlflow models serve` process
    server, port = _start_server(model_uri, tracking_uri, tmp_path)
    try:
        if family in ("pix2pix", "detection"):  # images of different sizes: one request each
            answers = [_served(port, _payload(family, [v])) for v in values]
            assert all(status == 200 for status, _, _ in answers), answers
            if family == "pix2pix":
                by_server = [np.asarray(body["predictions"][0], np.uint8) for _, body, _ in answers]
            else:
                frames = [comparable(family, body["predictions"]) for _, body, _ in answers]
                by_server = pd.concat(
                    [f.assign(image=i) for i, f in enumerate(frames) if len(f)] or [by_pyfunc[:0]]
                ).drop(columns=["class"], errors="ignore")
            latency = answers[0][2]
        else:
            status, body, latency = _served(port, _payload(family, values))
            assert status == 200, body
            by_server = comparable(family, body["predictions"])
        assert_same(family, by_server, by_pyfunc)
        print(f"{family}: one request answered in {latency * 1000:.0f} ms")
        bad, message = BAD_REQUESTS[family]
        status, body, _ = _served(port, bad)
        assert status == 400 and body["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
        assert message in body["message"]
    finally:
        server.terminate()
        server.wait(30)

    # 4. python -m zoo.export in both formats, from the model URI in a process of its own and
    # from the run id through main(); logged to the run under export/
    assert_exports(family, run_id, model_uri, tracking_uri, tmp_path)


def assert_exports(family: str, run_id: str, model_uri: str, tracking_uri: str, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from tests.conftest import artifacts
    from tests.test_export import export_cli
    from zoo.export import TOLERANCE, main

    onnx = export_cli(model_uri, "format=onnx", f"output={tmp_path / 'onnx'}", cwd=tmp_path)
    code = main([run_id, "format=torch_export", f"output={tmp_path / 'pt2'}"])
    if family == "detection":  # torchvision's detection models do not export: said in one line
        assert onnx.returncode == 2 and code == 2, onnx.stderr[-3000:]
        assert "detection models are not exported" in onnx.stderr
        assert len(onnx.stderr.strip().splitlines()) == 1, onnx.stderr
        return
    assert onnx.returncode == 0 and code == 0, onnx.stderr[-3000:]
    assert f"logged to run {run_id} under export/" in onnx.stdout
    for folder, file in (("onnx", "model.onnx"), ("pt2", "model.pt2")):
        record = json.loads((tmp_path / folder / "export.json").read_text())
        assert record["file"] == file and record["max_abs_error"] <= TOLERANCE, record
        assert record["dynamic"]  # a free batch dimension, traced from the logged example
    client = MlflowClient(tracking_uri)
    assert {"export/model.onnx", "export/model.pt2"} <= artifacts(client, run_id)


@pytest.mark.e2e
def test_eeg_predict_py_answers_a_trial_as_evaluate_py_did(make_cfg, tracking_uri, tmp_path):
    """The per-trial answers evaluate.py wrote for the test split equal predict.py's on the
    same subject files."""
    from tests.test_experiments import upstream_run
    from zoo.pipeline import evaluate, predict

    run_id = upstream_run(make_cfg, tracking_uri, FAMILIES["eeg"])
    report = tmp_path / "report"
    evaluate(make_cfg([f"run_id={run_id}", f"output_dir={report}"], config_name="evaluate"))
    evaluated = pd.read_csv(report / "predictions" / "test_trials.csv")
    assert len(evaluated) > 0
    subjects = Path(make_cfg([f"experiment={FAMILIES['eeg']}"]).data.data_dir)
    overrides = [f"run_id={run_id}", f"input={subjects}", f"output={tmp_path / 'out'}"]
    cfg = make_cfg([*overrides, "progress=false"], config_name="predict")
    predict(cfg)
    predicted = pd.read_csv(tmp_path / "out" / "predictions.csv")
    predicted["subject"] = predicted.file.str.extract(r"s(\d+)\.", expand=False).astype(int)
    both = evaluated.merge(predicted, on=["subject", "trial"], suffixes=("_eval", "_pred"))
    assert len(both) == len(evaluated)
    for column in ("label", "prediction", "windows"):
        assert both[f"{column}_eval"].tolist() == both[f"{column}_pred"].tolist(), column
    probs = [c for c in evaluated.columns if c.startswith(("prob_", "votes_"))]
    for column in probs:
        np.testing.assert_allclose(both[f"{column}_eval"], both[f"{column}_pred"], atol=1e-5)


def test_predict_py_refuses_bad_arguments_in_one_paragraph(tmp_path):
    proc = run_cli("predict.py", ["run_id=abc"], tmp_path)
    assert proc.returncode == 2 and "needs input=" in proc.stderr, failure_text(proc)
    proc = run_cli("predict.py", ["run_id=abc", f"input={tmp_path}", "device=tpu"], tmp_path)
    assert proc.returncode == 2 and "device='tpu'" in proc.stderr, failure_text(proc)
    assert "Traceback" not in proc.stderr
