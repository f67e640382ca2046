"""Parity of ``zoo.models.components.ppo`` with trl 1.12.0's ``PPOTrainer`` (the last TRL
release that has it, ``trl.experimental.ppo``).

**Which approach: TRL's own trainer is run, not re-implemented.** ``PPOTrainer.train()`` runs
one update (one rollout of 8 prompts, one PPO epoch, one minibatch of two micro-batches) on
tiny random Llama models (policy, a different reference, value and reward models: hidden 32,
2 layers, a 64-word ``WordLevel`` vocabulary), fp32 on the CPU, with its sampling fixed by its
own seed (``PPOConfig.seed``: TRL seeds torch, which ``generate`` samples from). The tensors it
computes are read, not recomputed: a trace function (``sys.settrace``) that follows only the
frame of ``PPOTrainer.train`` copies that frame's local variables at three of its lines (found
by their text, so that another TRL fails here loudly instead of reading the wrong line):

- ``contain_eos_token = torch.any(...)``: the rollout before any masking or penalty (the
  responses, TRL's truncated responses and ``sequence_lengths``, the log-probs from
  ``generate``'s scores, the reference log-probs, the values, the scores);
- ``gradient_accumulation_idx += 1``: each micro-batch after its update (its indices, new
  log-probs, logits, value predictions, losses and statistics);
- ``self.log(metrics)``: the step (masks, masked rollout, KL, rewards, advantages, returns,
  the per-update statistics and the logged metrics).

Wrapping the module's functions instead (``masked_whiten``, ``get_reward``, ...) would miss
what ``train()`` computes inline (the KL, the rewards, GAE, the losses), and re-executing its
source (``inspect.getsource``) would test a copy, not TRL. The rollout's tensors then go through
zoo's functions, and every result must equal TRL's within 1e-5 (fp32). Two runs cover the
options: the k1 KL estimator without reward whitening, k3 with it. The helpers TRL exports
(``masked_mean``/``masked_var``/``masked_whiten``, ``truncate_response``,
``first_true_indices``) are also called directly on random tensors.

Pad != EOS, and the policy can not sample pad (a hook on ``lm_head`` holds its logit at
-1e4: probability exactly 0), so TRL's pad-comparison lengths are exact here and must equal
ours (``lengths - 1 == sequence_lengths``); the deliberate difference (pad == EOS) is
``test_pad_equal_to_eos_is_where_we_differ``. The hook also raises EOS's logit by 1, so that
some responses stop and others run to the end (the missing-EOS penalty).

In the e2e tier: importing trl (transformers, datasets, accelerate, pandas) and the two runs
take 15-30 s on 2 cores.
"""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: the experimental module is the point
    pytest.importorskip("trl.experimental.ppo", reason="needs trl==1.12.0 (the dev extra)")

from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo import ppo_trainer as trl_ppo  # noqa: E402
from trl.experimental.utils import first_true_indices as trl_first_true_indices  # noqa: E402

from zoo.models.components import ppo  # noqa: E402

pytestmark = pytest.mark.e2e

TOL = 1e-5
WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"w{i}" for i in range(60))]
EOS_BOOST = 1.0
PROMPT_LENGTHS = (3, 5, 4, 2, 5, 3, 4, 5)  # left-padded to 6 with the BOS
CASES = {
    "k1": {"kl_estimator": "k1", "whiten_rewards": False},
    "k3-whiten-rewards": {"kl_estimator": "k3", "whiten_rewards": True},
}
# TRL's local variables read at these lines of PPOTrainer.train (by the text they start with)
PROBES = {
    "contain_eos_token = torch.any(": "rollout",
    "gradient_accumulation_idx += 1": "micro",
    "self.log(metrics)": "step",
}
LOGGED = [
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
]


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=0, msg=lambda m: f"{what}: {m}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_llama(tokenizer, kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        num_labels=1,
    )
    if kind == "score":  # TRL's reward and value models: AutoModelForSequenceClassification
        return LlamaForSequenceClassification(config)
    lm = LlamaForCausalLM(config)
    shift = torch.zeros(len(tokenizer))
    shift[tokenizer.eos_token_id] = EOS_BOOST
    is_pad = torch.arange(len(tokenizer)) == tokenizer.pad_token_id
    lm.lm_head.register_forward_hook(
        lambda module, args, out: (out + shift).masked_fill(is_pad, -1e4)
    )
    return lm


def probe_lines() -> dict[int, str]:
    src, start = inspect.getsourcelines(PPOTrainer.train)
    lines = {}
    for text, name in PROBES.items():
        hits = [start + i for i, line in enumerate(src) if line.strip().startswith(text)]
        assert len(hits) == 1, f"PPOTrainer.train has {len(hits)} lines starting {text!r}"
        lines[hits[0]] = name
    return lines


@contextmanager
def locals_at(code, lines: dict[int, str]):
    """Yields a list that fills with (name, copy of the frame's locals) each time a frame of
    ``code`` reaches one of ``lines`` (tensors detached and cloned: TRL edits some in place)."""
    snaps: list[tuple[str, dict]] = []

    def local_trace(frame, event, arg):
        if event == "line" and frame.f_lineno in lines:
            copied = {
                k: v.detach().clone() if torch.is_tensor(v) else v
                for k, v in frame.f_locals.items()
            }
            snaps.append((lines[frame.f_lineno], copied))
        return local_trace

    def global_trace(frame, event, arg):
        return local_trace if frame.f_code is code else None

    previous = sys.gettrace()
    sys.settrace(global_trace)
    try:
        yield snaps
    finally:
        sys.settrace(previous)


def run_trl(case: dict, output_dir) -> SimpleNamespace:
    """One update of TRL's PPOTrainer; its tensors at the probes, and the policy before it."""
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            np.random.seed(0)  # TRL's minibatch permutation
            torch.manual_seed(0)
            policy, ref_policy = tiny_llama(tokenizer, "lm"), tiny_llama(tokenizer, "lm")
            value_model, reward_model = (
                tiny_llama(tokenizer, "score"),
                tiny_llama(tokenizer, "score"),
            )
            gen = torch.Generator().manual_seed(1)
            prompts = [
                [
                    tokenizer.bos_token_id,
                    *torch.randint(4, len(tokenizer), (n,), generator=gen).tolist(),
                ]
                for n in PROMPT_LENGTHS
            ]
            args = PPOConfig(
                output_dir=str(output_dir),
                report_to=[],
                use_cpu=True,
                bf16=False,
                gradient_checkpointing=False,
                disable_tqdm=True,
                save_strategy="no",
                num_sample_generations=0,
                seed=0,
                total_episodes=len(prompts),  # num_total_batches 1: one rollout, one update
                per_device_train_batch_size=4,
                gradient_accumulation_steps=2,
                num_mini_batches=1,
                num_ppo_epochs=1,
                response_length=8,
                stop_token="eos",
                missing_eos_penalty=1.0,
                learning_rate=3e-3,
                cliprange=0.01,  # small clip ranges: both clipped branches are taken
                cliprange_value=0.01,
                **case,
            )
            trainer = PPOTrainer(
                args=args,
                processing_class=tokenizer,
                model=policy,
                ref_model=ref_policy,
                reward_model=reward_model,
                train_dataset=Dataset.from_dict({"input_ids": prompts}),
                value_model=value_model,
            )
            assert args.num_total_batches == 1
            policy_before = copy.deepcopy(policy)
            with locals_at(PPOTrainer.train.__code__, probe_lines()) as snaps:
                trainer.train()
        finally:
            np.random.set_state(np_state)
    by_name = {name: [s for n, s in snaps if n == name] for name in PROBES.values()}
    assert [len(by_name[n]) for n in ("rollout", "micro", "step")] == [1, 2, 1], [
        n for n, _ in snaps
    ]
    return SimpleNamespace(
        args=args,
        pad=tokenizer.pad_token_id,
        stop=tokenizer.eos_token_id,
        rollout=by_name["rollout"][0],
        micro=by_name["micro"],
        step=by_name["step"][0],
        policy_before=policy_before,
    )


def zoo_step(run) -> SimpleNamespace:
    """Our functions on TRL's rollout: its responses, log-probs, values and scores; for the
    update, each micro-batch's new log-probs, logits and value predictions."""
    a, r = run.args, run.rollout
    responses = r["responses"]
    post, lengths = ppo.truncate_after_stop(responses, run.stop, run.pad)
    masks = ppo.Masks.from_lengths(lengths, responses.shape[1])
    logprobs, ref_logprobs, values = ppo.mask_rollout(
        r["logprobs"], r["ref_logprobs"], r["values"], masks
    )
    stopped = post.gather(1, (lengths - 1)[:, None]).squeeze(1) == run.stop
    scores = torch.where(stopped, r["scores"], r["scores"] - a.missing_eos_penalty)
    out = ppo.rewards_and_advantages(
        logprobs,
        ref_logprobs,
        values,
        scores,
        masks,
        kl_coef=a.kl_coef,
        kl_estimator=a.kl_estimator,
        gamma=a.gamma,
        lam=a.lam,
        whiten_rewards=a.whiten_rewards,
    )
    context = r["context_length"]
    updates = []
    for m in run.micro:
        idx = torch.as_tensor(m["micro_batch_inds"])
        losses = ppo.ppo_losses(
            m["new_logprobs"],
            logprobs[idx],
            out["advantages"][idx],
            m["vpred_temp"][:, context - 1 : -1].squeeze(-1),  # unmasked: ppo_losses masks
            values[idx],
            out["returns"][idx],
            masks.padding[idx],
            masks.padding_p1[idx],
            cliprange=a.cliprange,
            cliprange_value=a.cliprange_value,
        )
        updates.append({**losses, "entropy": ppo.entropy(m["logits"]).mean()})
    per_update = {k: torch.stack([u[k] for u in updates]) for k in updates[0]}
    stats = ppo.step_statistics(
        out["kl"], logprobs, out["non_score_reward"], scores, masks, per_update
    )
    return SimpleNamespace(
        post=post,
        lengths=lengths,
        masks=masks,
        stopped=stopped,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        updates=updates,
        per_update=per_update,
        stats=stats,
        **out,
    )


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory):
    return run_trl(CASES[request.param], tmp_path_factory.mktemp("trl-ppo"))


@pytest.fixture(scope="module")
def ours(run):
    return zoo_step(run)


def test_the_run_exercises_every_branch(run):
    """The fixed seed's rollout has what the comparisons need: stopped and unstopped
    responses, no pad before a stop, and clipping in both losses."""
    r, s = run.rollout, run.step
    assert run.pad != run.stop
    stopped = s["contain_eos_token"]
    assert stopped.any() and not stopped.all(), stopped
    t = r["responses"].shape[1]
    real = torch.arange(t)[None] <= r["sequence_lengths"][:, None]
    assert not (r["responses"][real] == run.pad).any()
    assert s["pg_clipfrac_stats"].sum() > 0 and s["vf_clipfrac_stats"].sum() > 0
    assert s["args"].kl_estimator == run.args.kl_estimator


def test_truncation_lengths_and_masks(run, ours):
    r, s = run.rollout, run.step
    assert torch.equal(ours.post, r["postprocessed_responses"])
    assert torch.equal(ours.lengths - 1, r["sequence_lengths"])
    assert torch.equal(ours.masks.sequence_lengths, s["sequence_lengths"])
    assert torch.equal(ours.masks.padding, s["padding_mask"])
    assert torch.equal(ours.masks.padding_p1, s["padding_mask_p1"])
    assert torch.equal(ours.stopped, s["contain_eos_token"])


def test_masked_rollout_and_penalised_scores(run, ours):
    s = run.step
    close(ours.logprobs, s["logprobs"], "log-probs")
    close(ours.ref_logprobs, s["ref_logprobs"], "reference log-probs")
    close(ours.values, s["values"], "values")
    close(ours.scores, s["scores"], "scores after the missing-EOS penalty")


def test_kl_rewards_advantages_and_returns(run, ours):
    s = run.step
    close(ours.kl, s["kl"], f"KL ({run.args.kl_estimator})")
    est = ppo.kl_estimate(s["logprobs"], s["ref_logprobs"], run.args.kl_estimator)
    close(est, s["kl"], "kl_estimate")
    close(ours.non_score_reward, s["non_score_reward"], "non-score reward")
    close(ours.rewards, s["rewards"], f"rewards (whiten_rewards={run.args.whiten_rewards})")
    close(ours.advantages, s["advantages"], "advantages")
    close(ours.returns, s["returns"], "returns")


def test_losses_and_per_update_statistics(run, ours):
    s = run.step
    for i, (m, u) in enumerate(zip(run.micro, ours.updates, strict=True)):
        idx = torch.as_tensor(m["micro_batch_inds"])
        assert torch.equal(m["mb_logprobs"], s["logprobs"][idx])  # the indices mean the rows
        close(u["pg_loss"], m["pg_loss"], f"micro-batch {i}: policy loss")
        close(u["vf_loss"], m["vf_loss"], f"micro-batch {i}: value loss")
        close(u["pg_clipfrac"], m["pg_clipfrac"], f"micro-batch {i}: policy clip fraction")
        close(u["vf_clipfrac"], m["vf_clipfrac"], f"micro-batch {i}: value clip fraction")
        close(u["approxkl"], m["approxkl"], f"micro-batch {i}: approxkl")
        close(u["ratio"], m["ratio"].mean(), f"micro-batch {i}: ratio")
        close(u["entropy"], m["entropy"].mean(), f"micro-batch {i}: entropy")
    for ours_key, trl_key in [
        ("approxkl", "approxkl_stats"),
        ("pg_clipfrac", "pg_clipfrac_stats"),
        ("pg_loss", "pg_loss_stats"),
        ("vf_loss", "vf_loss_stats"),
        ("vf_clipfrac", "vf_clipfrac_stats"),
        ("entropy", "entropy_stats"),
        ("ratio", "ratio_stats"),
    ]:
        close(ours.per_update[ours_key], s[trl_key].flatten(), trl_key)


def test_logged_statistics(run, ours):
    logged = run.step["metrics"]
    for key in LOGGED:
        ours_value = float(ours.stats[key])
        assert abs(ours_value - logged[key]) <= TOL, (key, ours_value, logged[key])


def test_generate_scores_against_a_forward_pass(run, record_property):
    """TRL's rollout log-probs come from ``generate``'s scores (the incremental, KV-cached
    computation); ours from a forward pass like the update's. How far apart are they, for the
    policy before the update? (Loose bound: fp32 rounding, nothing systematic.)"""
    r, s = run.rollout, run.step
    context, temperature = r["context_length"], run.args.temperature
    with torch.no_grad():
        out = trl_ppo.forward(run.policy_before, r["query_responses"], run.pad)
        logits = out.logits[:, context - 1 : -1] / (temperature + 1e-7)
        forward_logprobs = torch.log_softmax(logits, -1).gather(-1, r["responses"][..., None])
    forward_logprobs = forward_logprobs.squeeze(-1)
    real = ~s["padding_mask"]
    gap = float((forward_logprobs - r["logprobs"])[real].abs().max())
    record_property("generate_vs_forward_max_abs_logprob_diff", gap)
    print(f"\n[{run.args.kl_estimator}] generate scores vs forward log-probs: max |diff| {gap:.3g}")
    assert gap < 1e-3
    # the first micro-batch's forward ran before any optimizer step: the same computation
    first = run.micro[0]
    idx = torch.as_tensor(first["micro_batch_inds"])
    expected = forward_logprobs[idx].masked_fill(s["padding_mask"][idx], ppo.INVALID_LOGPROB)
    close(first["new_logprobs"], expected, "first micro-batch's log-probs")


# --- TRL's exported helpers, called directly ---------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_masked_mean_var_whiten_equal_trl(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(6, 9, generator=g) * 3 + 1
    mask = torch.rand(6, 9, generator=g) < 0.6
    mask[:, 0] = True  # every row has a real value (the axis=1 mean)
    close(ppo.masked_mean(values, mask), trl_ppo.masked_mean(values, mask), "masked_mean")
    close(
        ppo.masked_mean(values, mask, axis=1),
        trl_ppo.masked_mean(values, mask, axis=1),
        "masked_mean(axis=1)",
    )
    for unbiased in (True, False):
        close(
            ppo.masked_var(values, mask, unbiased),
            trl_ppo.masked_var(values, mask, unbiased),
            f"masked_var(unbiased={unbiased})",
        )
    for shift_mean in (True, False):
        close(
            ppo.masked_whiten(values, mask, shift_mean),
            trl_ppo.masked_whiten(values, mask, shift_mean),
            f"masked_whiten(shift_mean={shift_mean})",
        )


def test_masked_var_refuses_one_value():
    """Where TRL divides by zero (one unmasked value: inf), ours raises."""
    values, mask = torch.arange(4.0), torch.tensor([False, True, False, False])
    assert not torch.isfinite(trl_ppo.masked_var(values, mask))
    with pytest.raises(ValueError, match="at least 2"):
        ppo.masked_var(values, mask)


def test_truncate_after_stop_equals_trl():
    """Ours against TRL's ``truncate_response`` and its ``sequence_lengths`` rule
    (``first_true_indices(postprocessed == pad) - 1``), pad != stop and never sampled."""
    pad, stop, vocab, t = 0, 1, 20, 10
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(2, vocab, (64, t), generator=g)
    for row in range(64):  # no stop, one, several; at the first and the last position too
        k = row % 4
        positions = torch.randperm(t, generator=g)[:k]
        responses[row, positions] = stop
    responses[1, 0] = responses[2, t - 1] = stop
    trl_post = trl_ppo.truncate_response(stop, pad, responses)
    trl_seq = trl_first_true_indices(trl_post == pad) - 1
    post, lengths = ppo.truncate_after_stop(responses, stop, pad)
    assert torch.equal(post, trl_post)
    assert torch.equal(lengths - 1, trl_seq)
    # no stop token: TRL skips truncation; its rule finds no pad, the full length
    post, lengths = ppo.truncate_after_stop(responses, None, pad)
    assert torch.equal(post, responses)
    assert torch.equal(lengths - 1, trl_first_true_indices(responses == pad) - 1)
    bools = torch.rand(64, t, generator=g) < 0.2
    assert torch.equal(ppo.first_true_indices(bools), trl_first_true_indices(bools))


def test_pad_equal_to_eos_is_where_we_differ():
    """The deliberate difference: with pad == EOS, TRL's rule stops at the EOS itself, leaving
    it out of every mask; ours counts it. Without a stop both give the full length."""
    eos = pad = 1
    responses = torch.tensor([[5, 6, eos, pad], [eos, pad, pad, pad], [5, 6, 7, 8]])
    trl_post = trl_ppo.truncate_response(eos, pad, responses)
    trl_seq = trl_first_true_indices(trl_post == pad) - 1
    _, lengths = ppo.truncate_after_stop(responses, eos, pad)
    assert trl_seq.tolist() == [1, -1, 3]
    assert (lengths - 1).tolist() == [2, 0, 3]
