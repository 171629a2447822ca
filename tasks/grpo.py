"""Stage `grpo`: Group Relative Policy Optimization on verifiable tasks, from the SFT model.

Every `num_iterations` optimizer steps the policy answers a fresh set of training problems
(tasks/data/verifiable.py; never a held-out one), G = num_generations sampled completions per problem in one
batched generation (tasks/train/rollouts.sample_responses). Each completion is scored by the reward
functions named in grpo.rewards (tasks/train/rewards.py; by default `correct`: the checker's exact match),
and its advantage is its reward relative to its group: (r - mean) / (std + eps), or r - mean without
std scaling (Dr. GRPO). No value model. The loss is the clipped ratio objective plus beta times the k3 KL
to the frozen reference (the SFT model), averaged as grpo.loss_type says (tasks/train/losses.grpo_loss).

Metrics (TRL's names): reward, reward_std (mean std within groups), frac_reward_zero_std, kl,
completions/mean_length, clip_ratio, and val/accuracy: greedy exact-match accuracy on held-out problems
(tasks/eval/tasks_accuracy.py, the same problems evaluate scores first), before training too
(val/accuracy_initial). Rollouts are cached in the state dir, so a run resumed mid-rollout continues on
it. Health alerts at the last step: reward_std 0 in every group for alerts.grpo_collapse_steps rollouts
in a row (no learning signal), or a rollout KL above alerts.grpo_max_kl.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import torch
from torch import nn

from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import GRPOConfig, Params
from tasks.core.launch import training_main
from tasks.data import verifiable
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.eval.tasks_accuracy import completion_text, prompt_ids, task_accuracy
from tasks.train import rewards
from tasks.train.alerts import alerts_at_end, kl_runaway, reward_collapse
from tasks.train.checkpoints import check_same_architecture, load_causal_lm, load_stage_model
from tasks.train.loop import Batch, train_stage
from tasks.train.lora import AdaptersOff, add_adapters, base_of
from tasks.train.losses import group_advantages, grpo_loss, kl_k3, token_logps
from tasks.train.open_model import stage_tokenizer, tokenizer_files_of
from tasks.train.rollouts import RolloutCache, Sampling, policy_autocast, sample_responses

log = logging.getLogger(__name__)


class GroupRelative:
    """The GRPO objective: rollouts of G completions per training problem, scored by `reward`."""

    def __init__(
        self,
        cfg: GRPOConfig,
        tokenizer: ChatTokenizer,
        reward: rewards.TextReward,
        reference: nn.Module | None,  # the frozen SFT model, or the policy with adapters off (grpo.lora)
        val_problems: list[verifiable.Problem],
        cache_dir: Any = None,
    ) -> None:
        self.cfg, self.tokenizer, self.reward, self.reference = cfg, tokenizer, reward, reference
        self.val_problems = val_problems
        self.G = cfg.num_generations
        self.sampling = Sampling(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k or None,
            stop=(tokenizer.end_id, tokenizer.eos_id),
            pad_id=tokenizer.pad_id,
        )
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.cache = RolloutCache(cache_dir or paths.STATE / "grpo", self.rank)
        self.rollout: Batch | None = None
        self.rollout_step = -1

    def problems_at(self, step: int) -> list[verifiable.Problem]:
        """The training problems of the rollout at `step` on this rank: a function of (seed, step, rank)."""
        n = self.cfg.train.micro_batch_size // self.G * self.cfg.train.grad_accum
        rng = random.Random(f"grpo:{self.cfg.train.seed}:{step}:{self.rank}:{self.world}")
        return [verifiable.draw(self.cfg.families, rng, heldout=False) for _ in range(n)]

    # ---------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def make_rollout(self, model: nn.Module, step: int) -> Batch:
        """G sampled completions per problem, their rewards, group-relative advantages, and the old and
        reference log-probs of every token; rows prompt-major (a group is G adjacent rows)."""
        problems = self.problems_at(step)
        prompts = [prompt_ids(self.tokenizer, p.prompt) for p in problems]
        seed = self.cfg.train.seed * 100_003 + step  # rollouts differ by run seed and by step
        batch = sample_responses(model, prompts, self.sampling, seed=seed, n_per_prompt=self.G)
        device = next(model.parameters()).device
        tokens, mask, lengths = (batch[k].to(device) for k in ("tokens", "mask", "lengths"))
        scores = []
        for r in range(tokens.shape[0]):
            start = len(prompts[r // self.G])
            text = completion_text(self.tokenizer, tokens[r, start : int(lengths[r])].tolist())
            scores.append(self.reward(problems[r // self.G].prompt, text))
        reward = torch.tensor(scores, dtype=torch.float32)
        advantages, group_std = group_advantages(reward, self.G, scale=self.cfg.scale_rewards)
        out = {"tokens": tokens, "mask": mask, "lengths": lengths}
        with policy_autocast(self.cfg.train.bf16, device):
            out["old_logps"] = token_logps(model(tokens[:, :-1]), tokens[:, 1:])  # [B, T-1]
            if self.reference is not None:  # beta > 0
                self.reference.to(device)
                out["ref_logps"] = token_logps(self.reference(tokens[:, :-1]), tokens[:, 1:])
                per_token = kl_k3(out["old_logps"], out["ref_logps"]) * mask
                out["kl"] = per_token.sum(-1) / mask.sum(-1).clamp_min(1)  # [B]
        out |= {"reward": reward, "advantages": advantages, "group_std": group_std}
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        start = step - step % self.cfg.num_iterations
        if self.rollout_step != start:
            if self.rollout is None and step == 0:
                self.cache.clear()  # a fresh run: rollouts of an earlier attempt are not this run's
            if step != start:  # resumed in the middle of a rollout's iterations: the weights moved since
                self.rollout = self.cache.load(start)
                log.info("resumed on the cached rollout of step %d (%s)", start, self.cache.path(start))
            else:
                self.rollout = self.make_rollout(model, start)
                zero_std = float((self.rollout["group_std"] == 0).float().mean())
                self.cache.save(start, self.rollout, {"zero_std": zero_std})
            self.rollout_step = start
        assert self.rollout is not None
        per = self.cfg.train.micro_batch_size
        rows = slice(micro_step * per, (micro_step + 1) * per)
        groups = slice(micro_step * per // self.G, (micro_step + 1) * per // self.G)
        out = {k: v[rows] for k, v in self.rollout.items() if k not in ("group_std", "zero_std")}
        out["group_std"] = self.rollout["group_std"][groups]
        width = int(out["lengths"].max())  # drop the columns only other micro-batches' rows need
        out["tokens"] = out["tokens"][:, :width]
        for k in ("mask", "old_logps", "ref_logps"):
            if k in out:
                out[k] = out[k][:, : width - 1]
        return out

    # ---------------------------------------------------------------------------------- GRPO loss
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, mask = batch["tokens"], batch["mask"]
        logps = token_logps(model(tokens[:, :-1]), tokens[:, 1:])  # [B, T-1]
        loss, stats = grpo_loss(
            logps,
            batch["old_logps"],
            batch["advantages"],
            mask,
            epsilon=self.cfg.epsilon,
            beta=self.cfg.beta,
            ref_logps=batch.get("ref_logps"),
            loss_type=self.cfg.loss_type,
            max_completion_length=self.cfg.max_new_tokens,
        )
        return loss, {
            "reward": float(batch["reward"].mean()),
            "reward_std": float(batch["group_std"].mean()),
            "frac_reward_zero_std": float((batch["group_std"] == 0).float().mean()),
            "kl": float(stats["kl"]),
            "clip_ratio": float(stats["clip_ratio"]),
            "completions/mean_length": float(mask.sum(-1).mean()),
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy exact-match accuracy on the held-out problems (none of them is ever a rollout prompt)."""
        if not self.val_problems:
            return {}
        acc = task_accuracy(model, self.tokenizer, self.val_problems, self.cfg.max_new_tokens)
        return {"val/accuracy": acc["accuracy"], "val/accuracy_lenient": acc["accuracy_lenient"]}

    def alerts(self, params: Params) -> list[str]:
        return reward_collapse(self.cache.means("zero_std"), params.alerts.grpo_collapse_steps) + kl_runaway(
            self.cache.means("kl"), params.alerts.grpo_max_kl, "GRPO"
        )

    def tokens_in(self, batch: Batch) -> int:
        return int(batch["tokens"].numel())


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.grpo  # names and ranges checked with the params (tasks/core/checks.py)
    tokenizer = stage_tokenizer(cfg.reference)  # an open model's own, carried by its checkpoint
    policy, _ = load_causal_lm(cfg.reference, tokenizer.fingerprint)
    reference: nn.Module | None = None
    adapters = None
    if cfg.lora.enabled:  # adapters on the policy; the reference is its own frozen base (adapters off)
        base = base_of(paths.checkpoint(cfg.reference), "checkpoint")
        adapters = add_adapters(policy, cfg.lora, cfg.train, base, where="grpo")
        reference = AdaptersOff(policy) if cfg.beta > 0 else None
    elif cfg.beta > 0:  # beta = 0: no KL term, no reference forward (as TRL)
        frozen, _ = load_causal_lm(cfg.reference, tokenizer.fingerprint)
        check_same_architecture(policy, frozen, (cfg.reference, cfg.reference))
        reference = frozen.requires_grad_(False).eval()

    def reward_model() -> Any:
        model, _ = load_stage_model("reward", tokenizer.fingerprint, kind="scalar_head")
        return model.float().eval()

    reward = rewards.combined(cfg.rewards, cfg.reward_weights, rewards.RewardContext(tokenizer, reward_model))
    val = verifiable.heldout_problems(cfg.families, cfg.val_problems)
    torch.manual_seed(cfg.train.seed)
    objective = GroupRelative(cfg, tokenizer, reward, reference, val)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy.to(device).eval()
    with policy_autocast(cfg.train.bf16, device):
        initial = {f"{k}_initial": v for k, v in objective.evaluate(policy).items()}
    log.info("before GRPO: %s on %d held-out problems (%s)", initial, len(val), cfg.reference)
    return train_stage(
        "grpo",
        policy,
        objective,
        cfg.train,
        tracker=tracker,
        checkpoint_model=Transformer(policy.config),
        config=policy.config,
        tokenizer_fingerprint=tokenizer.fingerprint,
        parent=cfg.reference,
        on_step=alerts_at_end(cfg.train.max_steps, lambda _: objective.alerts(params), params, tracker),
        extra_metrics=initial,
        files=tokenizer_files_of(tokenizer),
        adapters=adapters,
    )


if __name__ == "__main__":
    training_main("grpo", run, lambda params: params.grpo.train)
