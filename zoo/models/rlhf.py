"""RLHF: a reward model trained on preference pairs (stage 1), then PPO fine-tuning of a causal
language model against it (stage 2), with trl 1.12.0's PPO arithmetic
(``zoo.models.components.ppo``) and its defaults.

Stage 1, :class:`RewardModel`: a causal LM's backbone and a scalar head read at the last real
token; Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``; metric: pairwise accuracy.
At the end of its test it logs ``reward_model/reward_model.pt`` (its architecture, weights and
tokenizer), which stage 2 reads by run id (``model.reward.from_run``).

Stage 2, :class:`PPOPolicy`: the policy (a causal LM), a value model (a scalar head on a copy of
the policy's backbone, as TRL builds it), and a frozen reference: the initial policy, rebuilt
from ``model.source`` when needed rather than stored. Each training step is one PPO step: a
rollout of the batch's prompts by sampling with the KV cache, log-probs of policy and reference,
values, scores, KL-penalised rewards and GAE, then ``num_ppo_epochs`` epochs of minibatch
updates of the clipped policy and value losses (Lightning manual optimisation).

Where TRL 1.12.0 has a defect, this does better:

- the rollout's log-probs come from the same computation as the update's (a forward pass in
  the first update epoch's micro-batches, through ``zoo.kernels.token_logprobs``), so the ratio
  is exactly 1 at the first update (TRL takes them from ``generate``'s scores: #454, #2358);
- masks come from each response's length, so pad may equal EOS (SmolLM2's does);
- ``max_grad_norm`` clips the gradient; the sampling and minibatch order draw from generators
  seeded by the job's seed and kept in checkpoints (TRL reset the global seed: #1648);
- the reward model may have its own tokenizer: prompt and completion are decoded and re-encoded
  (TRL refused this: #3595);
- no ``[batch, length, vocab]`` tensor is built: log-probs come from hidden states.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric

from zoo.errors import ConfigError, DataError
from zoo.inference import Item, RawInputs, Skipped, Writer
from zoo.models.base import OptimizerFactory, SchedulerFactory, ZooModule, scheduler_config
from zoo.models.components import ppo
from zoo.models.components.causal_lm import (
    ScalarHeadModel,
    backbone,
    build_causal_lm,
    last_scores,
    load_weights,
    plain,
    positions,
    tokenizer_from_files,
)
from zoo.outputs import Figure, File, Section, Table

REWARD_ARTIFACT = "reward_model/reward_model.pt"


def token_logprobs(hidden, weight, tokens, temperature: float, entropy: bool = False):
    from zoo import kernels

    return kernels.token_logprobs(hidden, weight, tokens, temperature=temperature, entropy=entropy)


# --------------------------------------------------------------------------- rewards


def finished_sentence(prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
    """The demo's preference as a programmatic reward: 1 for a completion that ends one
    sentence exactly at its end; each further sentence end before it costs 0.5; a completion
    that never ends its sentence scores 0, one that is empty -1."""
    import re

    out = []
    for text in completions:
        text = text.strip()
        if not text:
            out.append(-1.0)
            continue
        ends = len(re.findall(r"[.!?](?=\s|$)", text))
        closed = bool(re.search(r"[.!?][\"')]?$", text))
        out.append((1.0 if closed else 0.0) - 0.5 * max(0, ends - (1 if closed else 0)))
    return out


def load_callable(path: str) -> Callable[[Sequence[Any], Sequence[str]], Sequence[float]]:
    module, _, name = str(path).rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"model.reward.callable={path}: cannot import it ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"model.reward.callable={path}: not callable")
    return fn


def check_scores(scores: Any, n: int, where: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32).reshape(-1)
    if t.numel() != n:
        raise DataError(f"{where}: returned {t.numel()} scores for {n} completions")
    bad = ~torch.isfinite(t)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DataError(f"{where}: returned a non-finite score ({float(t[i])}) for completion {i}")
    return t


class _TextScorer:
    """A reward model's scores of (prompt, completion) texts, encoded with its own tokenizer."""

    def __init__(self, net: ScalarHeadModel, spec: dict[str, Any]):
        self.net = net.eval().requires_grad_(False)
        self.spec = spec
        self.tokenizer = tokenizer_from_files(spec["tokenizer"])

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[str]) -> torch.Tensor:
        from zoo.data.rlhf import left_pad, pair_text

        tok, limit = self.tokenizer, int(self.spec["max_length"])
        seqs = []
        for p, c in zip(prompts, completions):
            ids = tok(pair_text(tok, p, c, bool(self.spec["chat"])), add_special_tokens=False)
            seqs.append(ids["input_ids"][-limit:])  # the end holds the answer
        device = next(self.net.parameters()).device
        ids, mask = left_pad(seqs, tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        return last_scores(self.net(ids, mask, positions(mask)), mask).float()


def reward_from_file(path: Path, where: str) -> _TextScorer:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"architecture", "state_dict", "preprocessing"} <= set(
        state
    ):
        raise ConfigError(f"{where}: {path} is not a zoo reward model file")
    arch = json.loads(state["architecture"])
    net = ScalarHeadModel(build_causal_lm(arch), share=True)
    net.load_state_dict(state["state_dict"])
    return _TextScorer(net, state["preprocessing"])


# --------------------------------------------------------------------------- stage 1


class RewardModel(ZooModule):
    """Preference pairs -> a scalar score per (prompt, response).

    Logs ``train/loss``, ``val/loss``, ``val/accuracy`` (the share of pairs whose chosen answer
    scores above the rejected one; ``val/accuracy_best``), ``val/margin``; ``test/loss``,
    ``test/accuracy``, ``test/margin``; a histogram of chosen and rejected scores per validation
    epoch and for test; and ``reward_model/reward_model.pt`` for stage 2.
    """

    def __init__(
        self,
        source: str,
        architecture: dict[str, Any],
        optimizer: OptimizerFactory | None,
        scheduler: SchedulerFactory | None = None,
        freeze_layers: int = 0,
        figures_every_n_epochs: int = 1,
        init_seed: int = 0,
        tiny: dict[str, Any] | None = None,  # in ``architecture`` already (source=tiny)
    ):
        super().__init__()
        self.source, self.arch = str(source), plain(architecture)
        self.save_hyperparameters(
            {"source": self.source, "freeze_layers": int(freeze_layers)}, logger=False
        )
        with torch.random.fork_rng():
            torch.manual_seed(int(init_seed))
            self.net = ScalarHeadModel(build_causal_lm(self.arch), share=True)
        self.freeze_layers = int(freeze_layers)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.figures_every = int(figures_every_n_epochs)
        self.train_loss = MeanMetric()
        self.loss = {s: MeanMetric() for s in ("val", "test")}
        self.acc = {s: MeanMetric() for s in ("val", "test")}
        self.margin = {s: MeanMetric() for s in ("val", "test")}
        self._metrics = nn.ModuleList(
            [*self.loss.values(), *self.acc.values(), *self.margin.values()]
        )
        self.val_acc_best = MaxMetric()
        self._scores: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}

    def configure_model(self) -> None:
        """Lightning's hook, before a checkpoint is restored: the source's pretrained weights,
        once, and never after ``load_state_dict`` (whose weights win)."""
        if getattr(self, "_loaded", False):
            return
        self._loaded = True
        if self.source != "tiny":
            lm = build_causal_lm(self.arch)
            load_weights(lm, self.source)
            self.net.backbone.load_state_dict(backbone(lm).state_dict())
        if self.freeze_layers:
            self.net.backbone.embed_tokens.requires_grad_(False)
            for layer in self.net.backbone.layers[: self.freeze_layers]:
                layer.requires_grad_(False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._loaded = True  # trained weights: configure_model reads no source any more
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        """One score per row (at its last real token)."""
        return last_scores(
            self.net(input_ids, attention_mask, positions(attention_mask)), attention_mask
        )

    def _step(self, batch):
        scores = self(batch["input_ids"], batch["attention_mask"])
        chosen, rejected = scores.chunk(2)
        diff = chosen - rejected
        return -F.logsigmoid(diff).mean(), chosen, rejected, diff

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, *_ = self._step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train/loss is {loss.item()} at step {self.global_step}")
        self.train_loss(loss)
        n = len(batch["index"])
        self.log(
            "train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n
        )
        return loss

    def _eval_step(self, split: str, batch) -> None:
        loss, chosen, rejected, diff = self._step(batch)
        n = len(batch["index"])
        self.loss[split](loss, n)
        self.acc[split]((diff > 0).float())
        self.margin[split](diff)
        self._scores["chosen"].append(chosen.detach().float().cpu().numpy())
        self._scores["rejected"].append(rejected.detach().float().cpu().numpy())

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_start(self) -> None:
        self._scores = {"chosen": [], "rejected": []}

    on_test_epoch_start = on_validation_epoch_start

    def _log_split(self, split: str) -> float:
        acc = float(self.acc[split].compute())
        self.log(f"{split}/loss", self.loss[split].compute(), prog_bar=split == "val")
        self.log(f"{split}/accuracy", acc, prog_bar=split == "val")
        self.log(f"{split}/margin", self.margin[split].compute())
        for m in (self.loss[split], self.acc[split], self.margin[split]):
            m.reset()
        return acc

    def on_validation_epoch_end(self) -> None:
        acc = self._log_split("val")
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(torch.tensor(acc))
        self.log("val/accuracy_best", self.val_acc_best.compute())
        if self.epoch_due(self.figures_every):
            e = self.current_epoch
            self._emit_histogram(f"figures/val/scores_epoch{e:03d}.png", f"val, epoch {e}")

    def on_test_epoch_end(self) -> None:
        acc = self._log_split("test")
        self._emit_histogram("figures/test/scores.png", "test")
        self.emit(File(REWARD_ARTIFACT, write=self._write_reward_file))
        chosen, rejected = (np.concatenate(self._scores[k]) for k in ("chosen", "rejected"))
        self.emit(
            Section("Reward model")
            .paragraph(
                f"On {len(chosen)} held-out preference pairs the chosen answer scores above the "
                f"rejected one in {acc:.1%} of them (mean margin "
                f"{float(np.mean(chosen - rejected)):.3f})."
            )
            .image("scores", "Scores of chosen and rejected answers", self._histogram("test"))
        )

    def _histogram(self, title: str):
        chosen, rejected = (np.concatenate(self._scores[k]) for k in ("chosen", "rejected"))

        def build():
            from zoo.plotting import plt

            fig, ax = plt.subplots(figsize=(6, 3.5))
            bins = np.linspace(
                min(chosen.min(), rejected.min()), max(chosen.max(), rejected.max()), 30
            )
            ax.hist(chosen, bins=bins, alpha=0.6, label="chosen")
            ax.hist(rejected, bins=bins, alpha=0.6, label="rejected")
            ax.set_xlabel("reward-model score")
            ax.set_ylabel("pairs")
            ax.set_title(f"Scores of chosen and rejected answers ({title})")
            ax.legend()
            fig.tight_layout()
            return fig

        return build

    def _emit_histogram(self, path: str, title: str) -> None:
        if self._scores["chosen"]:
            self.emit(Figure(path, self._histogram(title)))

    def _write_reward_file(self, path: Path) -> None:
        torch.save(
            {
                "architecture": json.dumps(self.arch),
                "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "preprocessing": self.preprocessing,
            },
            path,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["val_best"] = {"accuracy": self.val_acc_best.max_value.detach().clone()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        best = (checkpoint.get("val_best") or {}).get("accuracy")
        self.val_acc_best.reset()
        if best is not None and torch.isfinite(best):
            self.val_acc_best.update(best)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        scheduler = scheduler_config(self.scheduler_factory, optimizer)
        return (
            optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}
        )

    def parameter_groups(self) -> dict[str, nn.Module]:
        return {"backbone": self.net.backbone, "head": self.net.score}

    # ------------------------------------------------------------------ serving

    def serving_input(self, batch) -> dict[str, np.ndarray]:
        return {k: batch[k].cpu().numpy() for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def serve(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids = torch.as_tensor(inputs["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(inputs["attention_mask"], dtype=torch.long)
        return self(ids, mask).float().numpy()

    def raw_inputs(self) -> PairInputs:
        return PairInputs(self)


# --------------------------------------------------------------------------- stage 2


class PPOPolicy(ZooModule):
    """PPO fine-tuning of a causal LM against a reward (see the module docstring).

    Per PPO step it logs TRL's statistics under TRL's names (``objective/kl``,
    ``objective/entropy``, ``objective/scores``, ``objective/rlhf_reward``,
    ``objective/non_score_reward``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
    ``policy/entropy_avg``, ``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg``,
    ``val/ratio``, ``val/ratio_var``, ``val/num_eos_tokens``, ``eps``, ``lr``), the time of each
    part (``time/rollout``, ``time/scoring``, ``time/update``), and every
    ``samples_every_n_steps`` a table of samples (prompt, completion, score).

    On held-out prompts (greedy completions, deterministic): ``val/score``, ``val/kl`` (to the
    reference, summed over the completion), ``val/rlhf_reward`` (score - kl_coef * kl),
    ``val/length``, ``val/eos_rate``; for test the same and ``test/win_rate`` (the share of
    prompts whose completion the reward scores above the reference's; ties count half).
    """

    automatic_optimization = False

    def __init__(
        self,
        source: str,
        architecture: dict[str, Any],
        optimizer: OptimizerFactory | None,
        reward: dict[str, Any],
        scheduler: SchedulerFactory | None = None,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        num_ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        per_device_train_batch_size: int | None = None,
        whiten_rewards: bool = False,
        temperature: float = 0.7,
        response_length: int = 53,
        stop_token: str | None = "eos",
        missing_eos_penalty: float | None = None,
        max_grad_norm: float | None = None,
        samples_every_n_steps: int = 10,
        seed: int = 0,
        init_seed: int = 0,
        tracking_uri: str | None = None,
        tiny: dict[str, Any] | None = None,  # in ``architecture`` already (source=tiny)
    ):
        super().__init__()
        if kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"model.kl_estimator={kl_estimator!r}: expected k1 or k3")
        if stop_token not in ("eos", None):
            raise ConfigError(f"model.stop_token={stop_token!r}: expected eos or null")
        self.source, self.arch = str(source), plain(architecture)
        self.hp = {
            "kl_coef": float(kl_coef),
            "kl_estimator": kl_estimator,
            "cliprange": float(cliprange),
            "cliprange_value": float(cliprange_value),
            "vf_coef": float(vf_coef),
            "gamma": float(gamma),
            "lam": float(lam),
            "num_ppo_epochs": int(num_ppo_epochs),
            "num_mini_batches": int(num_mini_batches),
            "per_device_train_batch_size": per_device_train_batch_size,
            "whiten_rewards": bool(whiten_rewards),
            "temperature": float(temperature),
            "response_length": int(response_length),
            "stop_token": stop_token,
            "missing_eos_penalty": missing_eos_penalty,
            "max_grad_norm": max_grad_norm,
        }
        self.save_hyperparameters({"source": self.source, **self.hp}, logger=False)
        self.reward_cfg = dict(reward or {})
        if sum(bool(self.reward_cfg.get(k)) for k in ("from_run", "file", "callable")) != 1:
            raise ConfigError(
                "model.reward: give exactly one of from_run (a stage-1 run id), file (a "
                "reward_model.pt) or callable (a Python function, module.name)"
            )
        self.init_seed, self.seed = int(init_seed), int(seed)
        self.tracking_uri = tracking_uri
        self.samples_every = int(samples_every_n_steps)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.policy = self._initial_lm(load=False)
        self.value = ScalarHeadModel(self.policy)
        self._frozen: dict[str, Any] = {}  # reference and reward: rebuilt, never saved
        self._rng: dict[str, torch.Tensor] = {}
        self.ppo_step = 0
        self.episodes = 0
        self._start = time.time()
        self.eval_scores = {s: MeanMetric() for s in ("val", "test")}
        self.val_best = MaxMetric()
        self._eval: dict[str, list] = {}
        self.predict_reward: str | None = None  # predict.py's reward= (scores the completions)

    # ------------------------------------------------------------------ the models

    def _initial_lm(self, load: bool = True) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(self.init_seed)
            lm = build_causal_lm(self.arch)
        if load:
            load_weights(lm, self.source)
        return lm

    def configure_model(self) -> None:
        """Lightning's hook, before a checkpoint is restored: the source's pretrained weights
        into policy and value, once, and never after ``load_state_dict``."""
        if getattr(self, "_loaded", False):
            return
        self._loaded = True
        lm = self._initial_lm()
        self.policy.load_state_dict(lm.state_dict())
        self.value.backbone.load_state_dict(backbone(lm).state_dict())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._loaded = True  # trained weights: configure_model reads no source any more
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def reference(self) -> nn.Module:
        if "ref" not in self._frozen:
            ref = self._initial_lm().to(self.device).eval().requires_grad_(False)
            self._frozen["ref"] = ref
        return self._frozen["ref"]

    def scorer(self) -> Callable[[Sequence[Any], Sequence[str]], torch.Tensor]:
        if "reward" not in self._frozen:
            cfg = self.reward_cfg
            if cfg.get("callable"):
                fn = load_callable(cfg["callable"])
                where = f"model.reward.callable={cfg['callable']}"
                self._frozen["reward"] = lambda p, c: check_scores(fn(p, c), len(c), where)
            else:
                from zoo.fetch import fetch

                if cfg.get("from_run"):
                    key, uri = "model.reward.from_run", f"runs:/{cfg['from_run']}/{REWARD_ARTIFACT}"
                else:
                    key, uri = "model.reward.file", cfg["file"]
                scorer = reward_from_file(fetch(uri, key, self.tracking_uri), f"{key}={uri}")
                scorer.net.to(self.device)
                self._frozen["reward"] = scorer
        return self._frozen["reward"]

    def tokenizer(self):
        if "tokenizer" not in self._frozen:
            if not self.preprocessing:
                raise ConfigError(
                    "this PPOPolicy has no tokenizer yet: it comes from its data module when "
                    "fitting starts (or from the checkpoint it was loaded from)"
                )
            self._frozen["tokenizer"] = tokenizer_from_files(self.preprocessing["tokenizer"])
        return self._frozen["tokenizer"]

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._frozen.pop("tokenizer", None)

    # ------------------------------------------------------------------ pieces of a step

    def _generator(self, name: str) -> torch.Generator:
        """A CPU generator per purpose (``sample``, ``order``), seeded from the job's seed and
        kept in checkpoints, so a resumed job draws what the uninterrupted one would."""
        g = torch.Generator()
        state = self._rng.get(name)
        if state is None:
            g.manual_seed(self.seed * 1_000_003 + sum(map(ord, name)))
        else:
            g.set_state(state)
        return g

    def _stop_id(self) -> int:
        return int(self.tokenizer().eos_token_id)

    @torch.no_grad()
    def generate(
        self, lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, sample: bool, max_new: int
    ) -> torch.Tensor:
        """Responses [B, T] (KV-cache generation; sampling at ``temperature`` with top-k 0 and
        top-p 1 as TRL, or greedy), padded after each row's end."""
        tok = self.tokenizer()
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "max_new_tokens": int(max_new),
            "min_new_tokens": 1,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "use_cache": True,
        }
        if sample:
            kwargs |= {
                "do_sample": True,
                "temperature": self.temp,
                "top_k": 0,
                "top_p": 1.0,
            }
            g = self._generator("sample")
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(g.get_state())
                out = lm.generate(**kwargs)
                self._rng["sample"] = torch.get_rng_state()
        else:
            kwargs |= {"do_sample": False}
            out = lm.generate(**kwargs)
        return out[:, ids.shape[1] :]

    def _lengths(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses padded after their EOS, and their lengths (EOS included). Generation
        already ends a row at EOS, so TRL's ``stop_token`` eos and null end it alike here."""
        return ppo.truncate_after_stop(responses, self._stop_id(), self.tokenizer().pad_token_id)

    def _full(self, ids, mask, responses, lengths):
        t = responses.shape[1]
        rmask = (torch.arange(t, device=responses.device)[None] < lengths[:, None]).long()
        return torch.cat([ids, responses], 1), torch.cat([mask, rmask], 1)

    @property
    def temp(self) -> float:
        """The sampling temperature as TRL divides logits by it (+1e-7)."""
        return self.hp["temperature"] + 1e-7

    @staticmethod
    def response_hidden(lm: nn.Module, full_ids, full_mask, context: int):
        """The backbone's last hidden states at the positions that predict the response tokens,
        flattened to [B * T, H], and (B, T)."""
        out = backbone(lm)(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=positions(full_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state[:, context - 1 : -1]
        b, t, h = hidden.shape
        return hidden.reshape(b * t, h), (b, t)

    def logprobs(
        self, lm: nn.Module, full_ids, full_mask, context: int, responses, entropy: bool = False
    ):
        """Per-token log-probs [B, T] of ``responses`` under ``lm`` at the temperature (and the
        entropies), from the hidden states through ``zoo.kernels.token_logprobs``."""
        hidden, (b, t) = self.response_hidden(lm, full_ids, full_mask, context)
        res = token_logprobs(
            hidden, lm.get_output_embeddings().weight, responses.reshape(-1), self.temp, entropy
        )
        if entropy:
            return res[0].view(b, t), res[1].view(b, t)
        return res.view(b, t)

    @torch.no_grad()
    def exact_kl(self, full_ids, full_mask, context: int, masks: ppo.Masks, chunk: int = 256):
        """KL(policy || reference) of each completion [B]: the per-token KL of the two
        next-token distributions (at the temperature) over the whole vocabulary, summed over
        the completion's tokens; computed ``chunk`` positions at a time. Unlike the sampled
        estimate TRL logs (``objective/kl``), it is never negative, also on greedy text."""
        (hp_, (b, t)), (hq, _) = (
            self.response_hidden(lm, full_ids, full_mask, context)
            for lm in (self.policy, self.reference())
        )
        wp = self.policy.get_output_embeddings().weight
        wq = self.reference().get_output_embeddings().weight
        kl = torch.zeros(b * t, device=full_ids.device)
        for s in range(0, b * t, chunk):
            logp = torch.log_softmax((hp_[s : s + chunk] @ wp.T).float() / self.temp, -1)
            logq = torch.log_softmax((hq[s : s + chunk] @ wq.T).float() / self.temp, -1)
            kl[s : s + chunk] = (logp.exp() * (logp - logq)).sum(-1)
        return kl.view(b, t).masked_fill(masks.padding, 0).sum(1)

    def values(self, full_ids, full_mask, context: int) -> torch.Tensor:
        return self.value(full_ids, full_mask, positions(full_mask))[:, context - 1 : -1]

    def texts(self, responses: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        tok = self.tokenizer()
        return [
            tok.decode(r[: int(n)].tolist(), skip_special_tokens=True)
            for r, n in zip(responses, lengths)
        ]

    def score(self, prompts: Sequence[Any], completions: list[str]) -> torch.Tensor:
        return self.scorer()(prompts, completions).to(self.device).float()

    def _micro_batches(self, b: int, order: torch.Tensor) -> list[list[torch.Tensor]]:
        """Minibatches of micro-batches (index tensors) for one epoch's ``order``."""
        n_mini = self.hp["num_mini_batches"]
        if b % n_mini:
            raise ConfigError(
                f"data.batch_size={b} is not a multiple of model.num_mini_batches={n_mini}"
            )
        mini = b // n_mini
        micro = int(self.hp["per_device_train_batch_size"] or mini)
        if mini % micro:
            raise ConfigError(
                f"a minibatch of {mini} is not a multiple of "
                f"model.per_device_train_batch_size={micro}"
            )
        return [
            [order[s + m : s + m + micro] for m in range(0, mini, micro)] for s in range(0, b, mini)
        ]

    # ------------------------------------------------------------------ one PPO step

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hp
        ids, mask, prompts = batch["input_ids"], batch["attention_mask"], batch["prompts"]
        b, context = ids.shape
        opt = self.optimizers()
        t0 = time.perf_counter()
        self.policy.eval()  # no dropout: the rollout's and the update's log-probs match
        responses = self.generate(self.policy, ids, mask, True, hp["response_length"])
        post, lengths = self._lengths(responses)
        full_ids, full_mask = self._full(ids, mask, post, lengths)
        t1 = time.perf_counter()
        # the first epoch's order, drawn now: the rollout's log-probs are computed in its
        # micro-batches, the same computation as the first update's
        order_gen = self._generator("order")
        orders = [torch.randperm(b, generator=order_gen) for _ in range(hp["num_ppo_epochs"])]
        self._rng["order"] = order_gen.get_state()
        plan = [self._micro_batches(b, o.to(self.device)) for o in orders]
        with torch.no_grad():
            logprobs = torch.zeros(post.shape, device=self.device)
            for minibatch in plan[0]:
                for idx in minibatch:
                    logprobs[idx] = self.logprobs(
                        self.policy, full_ids[idx], full_mask[idx], context, post[idx]
                    )
            ref_logprobs = self.logprobs(self.reference(), full_ids, full_mask, context, post)
            values = self.values(full_ids, full_mask, context)
            completions = self.texts(post, lengths)
            scores = self.score(prompts, completions)
            ended = (
                post.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1) == self._stop_id()
            )
            if hp["missing_eos_penalty"] is not None:
                scores = scores - float(hp["missing_eos_penalty"]) * (~ended).float()
            masks = ppo.Masks.from_lengths(lengths, post.shape[1])
            logprobs, ref_logprobs, values = ppo.mask_rollout(logprobs, ref_logprobs, values, masks)
            ra = ppo.rewards_and_advantages(
                logprobs,
                ref_logprobs,
                values,
                scores,
                masks,
                hp["kl_coef"],
                hp["kl_estimator"],
                hp["gamma"],
                hp["lam"],
                hp["whiten_rewards"],
            )
        t2 = time.perf_counter()
        self.policy.train()
        stats: dict[str, list[torch.Tensor]] = {
            k: []
            for k in (
                "approxkl",
                "pg_clipfrac",
                "pg_loss",
                "vf_loss",
                "vf_clipfrac",
                "entropy",
                "ratio",
            )
        }
        first_ratio = None
        for epoch_plan in plan:
            for minibatch in epoch_plan:
                for idx in minibatch:
                    new_lp, ent = self.logprobs(
                        self.policy, full_ids[idx], full_mask[idx], context, post[idx], entropy=True
                    )
                    vpred = self.values(full_ids[idx], full_mask[idx], context)
                    out = ppo.ppo_losses(
                        new_lp,
                        logprobs[idx],
                        ra["advantages"][idx],
                        vpred,
                        values[idx],
                        ra["returns"][idx],
                        masks.padding[idx],
                        masks.padding_p1[idx],
                        hp["cliprange"],
                        hp["cliprange_value"],
                    )
                    loss = (out["pg_loss"] + hp["vf_coef"] * out["vf_loss"]) / len(minibatch)
                    if not torch.isfinite(loss):
                        pg, vf = out["pg_loss"].item(), out["vf_loss"].item()
                        raise FloatingPointError(
                            f"the PPO loss is {loss.item()} at PPO step {self.ppo_step} "
                            f"(policy loss {pg}, value loss {vf})"
                        )
                    self.manual_backward(loss)
                    if first_ratio is None:
                        first_ratio = out["ratio"].detach()
                    for k in (
                        "approxkl",
                        "pg_clipfrac",
                        "pg_loss",
                        "vf_loss",
                        "vf_clipfrac",
                        "ratio",
                    ):
                        stats[k].append(out[k].detach())
                    stats["entropy"].append(ent.detach().mean())
                if hp["max_grad_norm"]:
                    self.clip_gradients(
                        opt,
                        gradient_clip_val=float(hp["max_grad_norm"]),
                        gradient_clip_algorithm="norm",
                    )
                opt.step()
                opt.zero_grad()
        t3 = time.perf_counter()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self._log_step(
            ra, logprobs, scores, masks, stats, post, first_ratio, (t1 - t0, t2 - t1, t3 - t2), b
        )
        if self.samples_every and self.ppo_step % self.samples_every == 0:
            self._emit_samples(prompts, completions, scores)
        self.ppo_step += 1

    def _log_step(self, ra, logprobs, scores, masks, stats, post, first_ratio, times, b) -> None:
        per_update = {k: torch.stack(v) for k, v in stats.items()}
        metrics = ppo.step_statistics(
            ra["kl"], logprobs, ra["non_score_reward"], scores, masks, per_update
        )
        metrics = {k: self.all_gather(v.float()).mean() for k, v in metrics.items()}
        self.episodes += b * self.trainer.world_size
        metrics["val/num_eos_tokens"] = float((post == self._stop_id()).sum())
        metrics["eps"] = self.episodes / max(time.time() - self._start, 1e-9)
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["episode"] = float(self.episodes)
        metrics["policy/first_ratio"] = first_ratio.float()
        for name, value in zip(("rollout", "scoring", "update"), times):
            metrics[f"time/{name}"] = value
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=b)
        self.log(
            "train/rlhf_reward",
            metrics["objective/rlhf_reward"],
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=b,
        )

    def _emit_samples(self, prompts, completions, scores) -> None:
        step = self.ppo_step
        rows = {
            "step": [step] * len(completions),
            "prompt": [p if isinstance(p, str) else json.dumps(p) for p in prompts],
            "completion": list(completions),
            "score": [float(s) for s in scores.cpu()],
        }
        self.emit(Table(f"samples/step_{step:05d}.json", lambda: rows))

    # ------------------------------------------------------------------ held-out prompts

    @torch.no_grad()
    def _evaluate_batch(self, split: str, batch) -> None:
        ids, mask, prompts = batch["input_ids"], batch["attention_mask"], batch["prompts"]
        context = ids.shape[1]
        n = self.hp["response_length"]
        rows = self._eval.setdefault(split, [])
        self.policy.eval()
        for who, lm in (("policy", self.policy), ("reference", self.reference())):
            if who == "reference" and split != "test":
                continue
            responses = self.generate(lm, ids, mask, False, n)
            post, lengths = self._lengths(responses)
            full_ids, full_mask = self._full(ids, mask, post, lengths)
            completions = self.texts(post, lengths)
            scores = self.score(prompts, completions)
            masks = ppo.Masks.from_lengths(lengths, post.shape[1])
            if who == "policy":
                kl = self.exact_kl(full_ids, full_mask, context, masks)
                ended = post.gather(1, (lengths - 1)[:, None]).squeeze(1) == self._stop_id()
                for i in range(len(prompts)):
                    rows.append(
                        {
                            "index": int(batch["index"][i]),
                            "prompt": prompts[i],
                            "completion": completions[i],
                            "score": float(scores[i]),
                            "kl": float(kl[i]),
                            "length": int(lengths[i]),
                            "eos": bool(ended[i]),
                        }
                    )
            else:
                for row, c, s in zip(rows[-len(prompts) :], completions, scores):
                    row["reference"], row["reference_score"] = c, float(s)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate_batch("test", batch)

    def on_validation_epoch_start(self) -> None:
        self._eval["val"] = []

    def on_test_epoch_start(self) -> None:
        self._eval["test"] = []

    def _log_eval(self, split: str) -> dict[str, float]:
        rows = self._eval.get(split) or []
        if not rows:
            return {}
        score = np.array([r["score"] for r in rows])
        kl = np.array([r["kl"] for r in rows])
        out = {
            "score": float(score.mean()),
            "kl": float(kl.mean()),
            "rlhf_reward": float((score - self.hp["kl_coef"] * kl).mean()),
            "length": float(np.mean([r["length"] for r in rows])),
            "eos_rate": float(np.mean([r["eos"] for r in rows])),
        }
        if split == "test":
            ref = np.array([r["reference_score"] for r in rows])
            out["win_rate"] = float(np.mean((score > ref) + 0.5 * (score == ref)))
            out["reference_score"] = float(ref.mean())
        for k, v in out.items():
            self.log(f"{split}/{k}", v, prog_bar=k == "rlhf_reward", sync_dist=True)
        return out

    def on_validation_epoch_end(self) -> None:
        out = self._log_eval("val")
        if self.trainer.sanity_checking or not out:
            return
        self.val_best(torch.tensor(out["rlhf_reward"]))
        self.log("val/rlhf_reward_best", self.val_best.compute())

    def on_test_epoch_end(self) -> None:
        out = self._log_eval("test")
        rows = self._eval.get("test") or []
        if not rows:
            return
        table = {
            k: [
                r[k] if isinstance(r[k], str | float | int | bool) else json.dumps(r[k])
                for r in rows
            ]
            for k in ("prompt", "completion", "score", "kl", "reference", "reference_score")
        }
        self.emit(Table("samples/test.json", lambda: table))
        self.emit(Figure("figures/test/scores.png", self._score_figure(rows)))
        shown = rows[:8]
        self.emit(
            Section("Completions")
            .paragraph(
                f"On {len(rows)} held-out prompts (greedy completions): mean reward-model score "
                f"{out['score']:.3f} against the reference's {out['reference_score']:.3f}, "
                f"win rate {out['win_rate']:.1%}, KL to the reference {out['kl']:.3f} nats per "
                f"completion, {out['eos_rate']:.0%} of completions ended with EOS."
            )
            .table(
                ["prompt", "completion", "score", "reference", "ref. score"],
                [
                    [
                        r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]),
                        r["completion"],
                        f"{r['score']:.3f}",
                        r["reference"],
                        f"{r['reference_score']:.3f}",
                    ]
                    for r in shown
                ],
            )
            .image(
                "scores",
                "Scores of the policy's and the reference's completions",
                self._score_figure(rows),
            )
        )

    @staticmethod
    def _score_figure(rows):
        policy = np.array([r["score"] for r in rows])
        ref = np.array([r["reference_score"] for r in rows])

        def build():
            from zoo.plotting import plt

            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            lo, hi = min(policy.min(), ref.min()), max(policy.max(), ref.max())
            ax.scatter(ref, policy, s=12, alpha=0.7)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
            ax.set_xlabel("reference's score")
            ax.set_ylabel("policy's score")
            ax.set_title("Held-out prompts: policy vs reference")
            fig.tight_layout()
            return fig

        return build

    # ------------------------------------------------------------------ state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ppo"] = {
            "rng": {k: v.clone() for k, v in self._rng.items()},
            "ppo_step": self.ppo_step,
            "episodes": self.episodes,
            "val_best": self.val_best.max_value.detach().clone(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo") or {}
        self._rng = {k: v.clone() for k, v in (state.get("rng") or {}).items()}
        self.ppo_step = int(state.get("ppo_step", 0))
        self.episodes = int(state.get("episodes", 0))
        self.val_best.reset()
        best = state.get("val_best")
        if best is not None and torch.isfinite(best):
            self.val_best.update(best)

    def configure_optimizers(self):
        params = [
            p for p in [*self.policy.parameters(), *self.value.parameters()] if p.requires_grad
        ]
        optimizer = self.optimizer_factory(params=params)
        scheduler = scheduler_config(self.scheduler_factory, optimizer)
        return (
            optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}
        )

    def parameter_groups(self) -> dict[str, nn.Module]:
        return {"policy": self.policy, "value": self.value}

    # ------------------------------------------------------------------ serving

    def serving_input(self, batch) -> dict[str, np.ndarray]:
        return {k: batch[k].cpu().numpy() for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def serve(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids = torch.as_tensor(inputs["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(inputs["attention_mask"], dtype=torch.long)
        responses = self.generate(self.policy, ids, mask, False, self.hp["response_length"])
        return responses.numpy()

    def complete(
        self, prompts: list[Any], max_new_tokens: int | None = None
    ) -> list[dict[str, Any]]:
        """Greedy completions of raw prompts (strings or chat messages)."""
        from zoo.data.rlhf import encode, left_pad, prompt_text

        spec, tok = self.preprocessing, self.tokenizer()
        seqs = [
            encode(
                tok,
                prompt_text(tok, p, bool(spec["chat"])),
                int(spec["max_prompt_length"]),
                "left",
                "prompt",
            )
            for p in prompts
        ]
        ids, mask = left_pad(seqs, tok.pad_token_id)
        device = next(self.policy.parameters()).device
        self.policy.eval()
        responses = self.generate(
            self.policy,
            ids.to(device),
            mask.to(device),
            False,
            max_new_tokens or self.hp["response_length"],
        )
        post, lengths = self._lengths(responses)
        return [
            {"completion": c, "tokens": int(n)} for c, n in zip(self.texts(post, lengths), lengths)
        ]

    def predict_scorer(self, reward: str) -> _TextScorer:
        """A scorer for predict.py's ``reward=``: a stage-1 run id or a reward_model.pt."""
        from zoo.fetch import fetch

        cache = self._frozen.setdefault("predict_reward", {})
        if reward not in cache:
            path = Path(str(reward))
            uri = reward if path.suffix == ".pt" else f"runs:/{reward}/{REWARD_ARTIFACT}"
            cache[reward] = reward_from_file(
                fetch(uri, "reward", self.tracking_uri), f"reward={reward}"
            )
        return cache[reward]

    def raw_inputs(self) -> PromptInputs:
        return PromptInputs(self)


# --------------------------------------------------------------------------- raw inputs


def _as_prompt(value: Any, where: str) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):  # chat messages as JSON text
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return value
        else:
            if not text:
                raise DataError(f"{where}: an empty prompt")
            return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        from zoo.data.rlhf import prompt_of

        return prompt_of({"messages": value}, where)
    raise DataError(
        f"{where}: expected a prompt string or chat messages, got {type(value).__name__}"
    )


class PromptInputs(RawInputs):
    """Prompts (strings, or chat messages as lists of {role, content}) -> completions. Files:
    ``.jsonl`` of ``prompt`` or ``messages`` objects, or ``.txt`` with a prompt per line."""

    kind = "prompts"
    suffixes = (".jsonl", ".txt")
    batch_size = 8

    def read(self, path: Path) -> list[Item | Skipped]:
        from zoo.data.rlhf import prompt_of, read_jsonl

        if path.suffix.lower() == ".txt":
            items: list[Item | Skipped] = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    items.append(Item(f"{path.name}:{n}", line, {"file": path.name, "line": n}))
            return items
        return [
            Item(f"{path.name}:{n}", prompt_of(obj, f"{path}:{n}"), {"file": path.name, "line": n})
            for n, obj in read_jsonl(path)
        ]

    def parse(self, model_input: Any) -> list[Any]:
        if hasattr(model_input, "columns"):
            cols = [str(c) for c in model_input.columns]
            col = "prompt" if "prompt" in cols else "messages" if "messages" in cols else cols[0]
            values = list(model_input[col])
        elif isinstance(model_input, dict):
            values = list(np.atleast_1d(model_input.get("prompt", model_input.get("messages"))))
        elif isinstance(model_input, str) or (
            isinstance(model_input, list) and model_input and isinstance(model_input[0], dict)
        ):
            values = [model_input]
        else:
            values = list(model_input)
        if not values:
            raise DataError("inputs: no prompts")
        return [_as_prompt(v, f"inputs[{i}]") for i, v in enumerate(values)]

    def answer(self, values: list[Any]) -> list[dict[str, Any]]:
        return self.module.complete(values)

    def example(self, datamodule: Any) -> Any:
        import pandas as pd

        return pd.DataFrame({"prompt": datamodule.raw_example()})

    def writer(self, output: Path) -> Writer:
        return JsonlWriter(output / "completions.jsonl", self.module)

    def configure(self, cfg: Any) -> None:
        reward = (cfg.get("reward") if hasattr(cfg, "get") else None) or None
        self.module.predict_reward = reward


class JsonlWriter(Writer):
    """Completions as JSONL: the item's file and line, its prompt, the completion (and its
    reward-model score when predict.py is given ``reward=<run id or file>``)."""

    def __init__(self, path: Path, module: PPOPolicy):
        self.path, self.module = path, module
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = self.path.open("w", encoding="utf-8")

    def add(self, items: list[Item], records: list[dict[str, Any]]) -> None:
        reward = self.module.predict_reward
        scores = None
        if reward:
            scorer = self.module.predict_scorer(reward)
            scores = scorer([it.value for it in items], [r["completion"] for r in records])
        for i, (it, r) in enumerate(zip(items, records)):
            row = {**it.meta, "prompt": it.value, **r}
            if scores is not None:
                row["score"] = float(scores[i])
            self.f.write(json.dumps(row) + "\n")

    def close(self) -> list[Path]:
        self.f.close()
        return [self.path]


class PairInputs(RawInputs):
    """(prompt, response) pairs -> reward-model scores. Files: ``.jsonl`` of preference pairs
    (both answers scored) or of ``prompt``/``response`` objects."""

    kind = "pairs"
    suffixes = (".jsonl",)
    batch_size = 16

    def __init__(self, module: RewardModel):
        super().__init__(module)
        self.tokenizer = tokenizer_from_files(self.spec["tokenizer"])

    def read(self, path: Path) -> list[Item | Skipped]:
        from zoo.data.rlhf import prompt_of, read_jsonl

        items: list[Item | Skipped] = []
        for n, obj in read_jsonl(path):
            where = f"{path}:{n}"
            prompt = prompt_of(obj, where)
            for key in ("response", "chosen", "rejected"):
                if isinstance(obj.get(key), str):
                    items.append(
                        Item(
                            f"{path.name}:{n}:{key}",
                            (prompt, obj[key]),
                            {"file": path.name, "line": n, "answer": key},
                        )
                    )
        return items

    def parse(self, model_input: Any) -> list[tuple[Any, str]]:
        if hasattr(model_input, "columns"):
            cols = [str(c) for c in model_input.columns]
            if {"prompt", "response"} <= set(cols):
                rows = zip(model_input["prompt"], model_input["response"])
            else:
                rows = model_input.itertuples(index=False, name=None)
        else:
            rows = model_input
        out = []
        for i, row in enumerate(rows):
            row = list(row)
            if len(row) != 2 or not all(isinstance(x, str) and x.strip() for x in row):
                raise DataError(
                    f"inputs row {i}: expected a (prompt, response) pair of non-empty texts"
                )
            out.append((row[0], row[1]))
        if not out:
            raise DataError("inputs: no (prompt, response) pairs")
        return out

    def network_input(self, values: list[tuple[Any, str]]) -> dict[str, np.ndarray]:
        from zoo.data.rlhf import left_pad, pair_text

        tok, limit = self.tokenizer, int(self.spec["max_length"])
        seqs = [
            tok(pair_text(tok, p, r, bool(self.spec["chat"])), add_special_tokens=False)[
                "input_ids"
            ][-limit:]
            for p, r in values
        ]
        ids, mask = left_pad(seqs, tok.pad_token_id)
        return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def answer(self, values: list[tuple[Any, str]]) -> list[dict[str, Any]]:
        scores = self.module.serve(self.network_input(values))
        return [{"score": float(s)} for s in scores]

    def example(self, datamodule: Any) -> Any:
        import pandas as pd

        pairs = datamodule.raw_example()
        return pd.DataFrame({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})

    def writer(self, output: Path) -> Writer:
        from zoo.inference import TableWriter

        return TableWriter(output / "scores.csv")
