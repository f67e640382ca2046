"""The RLHF family: the demo's prompts and preference pairs (TRL's JSONL formats) and their bad
input, model sources, PPO's masks when pad equals EOS, the reward callable's checks, one real
PPO step of a tiny Llama (the ratio is exactly 1 at the first update; a non-finite loss stops
naming the step), and (end to end, in tests/test_experiments.py) both stages through mlflow."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from zoo.data.demo.rlhf import write_demo_rlhf
from zoo.data.rlhf import PreferenceDataModule, PromptDataModule, read_jsonl
from zoo.errors import ConfigError, DataError
from zoo.models.components import ppo
from zoo.models.components.causal_lm import architecture, source_folder
from zoo.models.rlhf import PPOPolicy, check_scores, finished_sentence, reward_from_file

UPSTREAM = {"rlhf_ppo_demo": ("rlhf_reward_demo", "model.reward.from_run")}
E2E_ONLY = ("rlhf_ppo_demo",)  # SmolLM2-135M: minutes of CPU per PPO step at debug=fast
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_rlhf(tmp_path_factory.mktemp("rlhf") / "rlhf_demo", 200, 16, 16)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_demo_holds_a_preference_the_programmatic_reward_agrees_with(demo):
    pairs = [o for _, o in read_jsonl(demo / "preferences" / "train.jsonl")]
    prompts = [o for _, o in read_jsonl(demo / "prompts" / "train.jsonl")]
    assert len(pairs) == len(prompts) == 200
    assert [p["prompt"] for p in pairs] == [p["prompt"] for p in prompts]
    chosen = finished_sentence([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = finished_sentence([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert all(c == 1.0 for c in chosen)  # every chosen answer closes its sentence once
    assert np.mean(np.array(chosen) > np.array(rejected)) > 0.95
    # held-out splits come from other pages of the docs
    train = {p["chosen"] for p in pairs}
    test = [o["chosen"] for _, o in read_jsonl(demo / "preferences" / "test.jsonl")]
    assert not train & set(test)


def test_finished_sentence_scores():
    assert finished_sentence(["p"] * 4, ["ends here.", "runs on. And on.", "never ends", " "]) == [
        1.0,
        0.5,
        0.0,
        -1.0,
    ]


def test_a_malformed_jsonl_line_is_named(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", ['{"prompt": "a"}', '{"prompt": "b"', "[1]"])
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    write_lines(path, ['{"prompt": "a"}', "[1]"])
    with pytest.raises(DataError, match=r"train\.jsonl:2: expected a JSON object"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen' must be a non-empty string"),
        ({"prompt": "p", "chosen": "same.", "rejected": " same. "}, "are the same text"),
        ({"chosen": "c", "rejected": "r"}, "expected a non-empty 'prompt'"),
    ],
)
def test_a_bad_preference_pair_is_named_by_file_and_line(tmp_path, row, message):
    good = json.dumps({"prompt": "p", "chosen": "a.", "rejected": "b"})
    for split in ("train", "val", "test"):
        write_lines(tmp_path / f"{split}.jsonl", [good, good])
    write_lines(tmp_path / "val.jsonl", [good, json.dumps(row)])
    dm = PreferenceDataModule(str(tmp_path), tokenizer="tiny", chat=False)
    with pytest.raises(DataError, match=rf"val\.jsonl:2: .*{message}"):
        dm.setup()


def test_a_prompt_longer_than_the_context_follows_the_truncation_rule(tmp_path):
    long = json.dumps({"prompt": "word " * 80})
    short = json.dumps({"messages": [{"role": "user", "content": "Say hi."}]})
    for split in ("train", "val", "test"):
        write_lines(tmp_path / f"{split}.jsonl", [short, long, short])

    def module(rule):
        return PromptDataModule(
            str(tmp_path), tokenizer="tiny", chat=False, truncation=rule, max_prompt_length=40
        )

    with pytest.raises(DataError, match=r"train\.jsonl:2: 8[01] tokens, more than the limit of 40"):
        module("error").setup()
    left = module("left")
    left.setup()
    assert len(left.datasets["train"]) == 3 and len(left.datasets["train"].ids[1]) == 40
    assert left.summary()["train prompts"] == "3 (1 truncated)"
    drop = module("drop")
    drop.setup()
    assert len(drop.datasets["train"]) == 2 and drop.summary()["val prompts"] == "2 (1 dropped)"
    assert isinstance(drop.datasets["train"].prompts[0], list)  # chat messages kept as such
    batch = drop.collate_fn([drop.datasets["train"][i] for i in range(2)])
    assert batch["attention_mask"][:, -1].all()  # left padding: every prompt ends at the edge


def test_a_model_source_that_is_not_a_causal_lm_is_refused(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    )
    with pytest.raises(ConfigError, match="not a causal language model"):
        architecture(str(bert))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match="must be .gguf"):
        source_folder(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConfigError, match="not a causal language model transformers can read"):
        source_folder(str(tmp_path / "broken.gguf"))
    with pytest.raises(ConfigError, match="no such file or folder"):
        source_folder(str(tmp_path / "missing"))


def test_a_reward_callable_with_non_finite_scores_is_named():
    with pytest.raises(DataError, match=r"my\.reward: returned a non-finite score \(nan\)"):
        check_scores([1.0, float("nan")], 2, "my.reward")
    with pytest.raises(DataError, match="returned 1 scores for 2 completions"):
        check_scores([1.0], 2, "my.reward")


def test_masks_come_from_lengths_so_pad_may_equal_eos():
    eos = pad = 2
    responses = torch.tensor([[5, 6, eos, pad, pad], [7, 8, 9, 10, 11], [eos, pad, pad, pad, pad]])
    post, lengths = ppo.truncate_after_stop(responses, eos, pad)
    assert lengths.tolist() == [3, 5, 1]  # the EOS itself is a real, trained token
    masks = ppo.Masks.from_lengths(lengths, 5)
    assert masks.padding.tolist()[0] == [False, False, False, True, True]
    assert masks.padding_p1.tolist()[0] == [False, False, False, False, True]
    assert not masks.padding[1].any()


def _tiny_policy(reward: str, **hp) -> PPOPolicy:
    arch = architecture("tiny", TINY)
    return PPOPolicy(
        "tiny",
        arch,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, eps=1e-5),
        reward={"callable": reward},
        response_length=6,
        **hp,
    )


def _fit(module: PPOPolicy, demo: Path, steps: int) -> L.Trainer:
    dm = PromptDataModule(
        str(demo / "prompts"), tokenizer="tiny", chat=False, batch_size=4, subset=2
    )
    trainer = L.Trainer(
        max_steps=-1,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def test_a_ppo_step_updates_the_policy_with_a_ratio_of_exactly_one_at_the_first_update(demo):
    torch.manual_seed(0)
    module = _tiny_policy("zoo.models.rlhf.finished_sentence", num_ppo_epochs=2, num_mini_batches=2)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = _fit(module, demo, 1)
    m = trainer.callback_metrics
    assert float(m["policy/first_ratio"]) == 1.0  # bit for bit: the same computation
    for key in ("objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg"):
        assert torch.isfinite(m[key]), key
    assert float(m["objective/entropy"]) > 0 and 0 <= float(m["policy/clipfrac_avg"]) <= 1
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert module.ppo_step == 1 and {"sample", "order"} <= set(module._rng)


def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)


def test_a_non_finite_reward_or_loss_stops_the_job_naming_it(demo, monkeypatch):
    module = _tiny_policy("tests.test_rlhf.nan_reward")
    with pytest.raises(DataError, match=r"tests\.test_rlhf\.nan_reward: returned a non-finite"):
        _fit(module, demo, 1)

    real = ppo.ppo_losses

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        return out | {"pg_loss": out["pg_loss"] * float("inf")}

    monkeypatch.setattr(ppo, "ppo_losses", broken)
    module = _tiny_policy("zoo.models.rlhf.finished_sentence")
    with pytest.raises(FloatingPointError, match="the PPO loss is .* at PPO step 0"):
        _fit(module, demo, 1)


def _with_preprocessing(module, chat: bool = False, **limits):
    from zoo.models.components.causal_lm import load_tokenizer, tokenizer_files

    module.preprocessing = {
        "tokenizer": tokenizer_files(load_tokenizer("tiny")),
        "chat": chat,
        "truncation": "left",
        **limits,
    }
    return module.eval()


def test_prompts_in_completions_and_scores_out(tmp_path):
    """The logged model's and predict.py's path: prompts (strings, chat messages, a JSONL and a
    text file) answered with greedy completions, scored by a reward-model file when given."""
    import pandas as pd

    from zoo.inference import predict_path, respond
    from zoo.models.rlhf import RewardModel

    torch.manual_seed(0)
    policy = _with_preprocessing(
        _tiny_policy("zoo.models.rlhf.finished_sentence"), max_prompt_length=32
    )
    chat = [{"role": "user", "content": "Finish: the loop ends"}]
    answered = respond(policy, pd.DataFrame({"prompt": ["The for statement", json.dumps(chat)]}))
    assert list(answered.columns) == ["completion", "tokens"] and len(answered) == 2
    assert (answered["tokens"] >= 1).all() and (answered["tokens"] <= 6).all()
    again = respond(policy, ["The for statement"])  # greedy: the same answer every time
    assert again["completion"][0] == answered["completion"][0]
    with pytest.raises(DataError, match=r"inputs\[0\]: an empty prompt"):
        respond(policy, ["  "])

    reward = _with_preprocessing(
        RewardModel("tiny", architecture("tiny", TINY), optimizer=None), max_length=64
    )
    reward_file = tmp_path / "reward_model.pt"
    reward._write_reward_file(reward_file)
    scores = respond(reward, pd.DataFrame({"prompt": ["a", "b"], "response": ["x.", "y"]}))
    assert list(scores.columns) == ["score"] and np.isfinite(scores["score"]).all()

    folder = tmp_path / "in"
    write_lines(
        folder / "a.jsonl", [json.dumps({"prompt": "Hello"}), json.dumps({"messages": chat})]
    )
    write_lines(folder / "b.txt", ["One prompt per line", "", "Another"])
    raw = policy.raw_inputs()
    raw.configure({"reward": str(reward_file)})
    done = predict_path(raw, folder, tmp_path / "out", batch_size=2, progress=False)
    rows = [
        json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()
    ]
    assert done.items == 4 and len(rows) == 4
    assert [(r["file"], r["line"]) for r in rows] == [
        ("a.jsonl", 1),
        ("a.jsonl", 2),
        ("b.txt", 1),
        ("b.txt", 3),
    ]
    expected = reward_from_file(reward_file, "reward")(
        [r["prompt"] for r in rows], [r["completion"] for r in rows]
    )
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)


# --------------------------------------------------------------------------- end to end


def check_experiment_run(cfg, run, arts, html, evaluated, client):
    """What only this family logs, checked after the shared checks of
    tests/test_experiments.py::test_experiment_end_to_end."""
    m = run.data.metrics
    if cfg.model._target_.endswith("RewardModel"):
        for key in ("train/loss", "val/loss", "val/accuracy", "val/accuracy_best", "test/margin"):
            assert key in m, key
        assert 0 <= m["test/accuracy"] <= 1
        assert {"reward_model/reward_model.pt", "figures/test/scores.png"} <= arts
        assert "Reward model" in html and "test/accuracy" in evaluated
        return
    trl = (
        "objective/kl",
        "objective/entropy",
        "objective/scores",
        "objective/rlhf_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "eps",
    )
    for key in (*trl, "time/rollout", "time/update", "val/score", "test/win_rate", "test/kl"):
        assert key in m, key
    assert m["test/kl"] >= 0 and 0 <= m["test/win_rate"] <= 1
    history = client.get_metric_history(run.info.run_id, "policy/first_ratio")
    assert history and all(h.value == 1.0 for h in history)
    assert {"samples/step_00000.json", "samples/test.json", "figures/test/scores.png"} <= arts
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "samples/test.json")).read_text()
    )
    assert {"prompt", "completion", "score", "reference"} <= set(table["columns"])
    assert "Completions" in html and "test/win_rate" in evaluated


# --------------------------------------------------------------------------- faults

PPO_RESUMABLE = [
    "experiment=rlhf_ppo_tiny_demo",
    "data.subset=3",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "seed=7",
    "callbacks.rich_progress_bar=null",
    "tracking.log_model=false",
]


@pytest.mark.faults
def test_kill_9_mid_ppo_then_resume_continues_the_same_run_exactly(sqlite_uri, tmp_path):
    """kill -9 in epoch 2, two PPO steps into it; resumed from last.ckpt, the job continues the
    same mlflow run and every PPO statistic, held-out score and test metric equals the
    uninterrupted job's: the sampling and minibatch-order generators, the PPO step count and
    the optimizer travel in the checkpoint."""
    from tests.conftest import start_cli
    from tests.test_faults import (
        _held_at,
        _history,
        _resume_then_finish,
        _wait_until,
        _whole_and_resumed_runs,
    )

    env = {"MLFLOW_TRACKING_URI": sqlite_uri}
    args = PPO_RESUMABLE
    whole = start_cli("train.py", [*args, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path, env)
    ready = tmp_path / "held"
    # 4 optimizer steps per PPO step (num_ppo_epochs); 3 PPO steps per epoch: after the
    # second PPO step of epoch 2
    first_args = [*args, *_held_at(32, ready), f"hydra.run.dir={tmp_path / 'first'}"]
    first = start_cli("train.py", first_args, tmp_path, env)
    _wait_until(first, ready.exists, ready.name, timeout=600)
    import os
    import signal

    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    # Lightning 2.6 rewrites last.ckpt only in an epoch whose monitored score improved, so the
    # checkpoint may be older than epoch 1's end: the resume must be exact from wherever it is
    assert state["ppo"]["ppo_step"] == 3 * (state["epoch"] + 1)
    assert {"sample", "order"} <= set(state["ppo"]["rng"])
    _resume_then_finish(args, last, whole, tmp_path, env)
    client, a, b = _whole_and_resumed_runs(sqlite_uri, tmp_path)
    assert b.info.status == "FINISHED"
    for key in (
        "objective/kl",
        "objective/scores",
        "loss/policy_avg",
        "loss/value_avg",
        "policy/first_ratio",
        "val/score",
        "val/kl",
    ):
        ha, hb = _history(client, a.info.run_id, key), _history(client, b.info.run_id, key)
        assert ha and hb == ha, f"{key}: {hb} vs {ha}"
    for key in ("test/score", "test/kl", "test/win_rate"):
        assert b.data.metrics[key] == a.data.metrics[key], key
