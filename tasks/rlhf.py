"""Stage `rlhf`: PPO on prompts, policy and value from the SFT model, reward from the reward model.

Every `ppo_epochs` optimizer steps the current policy samples a rollout batch; in between it is
optimised on that rollout (clipped surrogate + clipped value loss). Per-token rewards are the KL penalty
to the frozen SFT reference, plus the reward model's score on the last response token; advantages by GAE.
Every rollout is saved in the state dir with the KL coefficient after its update, so a resumed run
continues on exactly the rollout (and coefficient) it was using and ends with the same weights.

KL coefficient: fixed, or adaptive (Ziegler et al. 2019), which moves it so the rollout KL tracks
`target_kl`. Held-out reward: responses sampled with fixed seeds on held-out prompts, scored by the
reward model, for the starting policy (`val/reward_mean_initial`) and at each evaluation (`val/reward_mean`). Health alert: any rollout KL above `alerts.ppo_max_kl` (checked at the last step, before
anything is written; `alerts.fail_on_alert` makes it fail the stage).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from models.generate import generate
from models.heads import PolicyWithValue, last_token_values
from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import Params, RLHFConfig
from tasks.core.io import atomic_write_bytes
from tasks.core.launch import training_main
from tasks.core.stage import StageError
from tasks.data import chat_data
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.dpo import alerts_at_end, check_same_architecture
from tasks.train.loop import Batch, load_causal_lm, load_stage_model, train_stage
from tasks.train.losses import gae, masked_mean, masked_whiten, ppo_losses, token_logps

log = logging.getLogger(__name__)

# Until tasks/core/config.py has `RLHFConfig.kl_horizon`: the adaptive controller's horizon (TRL's default).
KL_HORIZON_DEFAULT = 10_000
EVAL_SEED = 999_983  # held-out responses are sampled with seeds no rollout uses (rollouts: seed = step)


class KLController:
    """The per-token KL penalty coefficient. Fixed, or adaptive as in Ziegler et al. (2019) / TRL:
    e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n_samples / horizon."""

    def __init__(self, value: float, adaptive: bool, target: float, horizon: int) -> None:
        if adaptive and (target <= 0 or horizon <= 0):
            raise StageError(
                f"adaptive KL needs rlhf.target_kl > 0 and a horizon > 0, got {target}, {horizon}"
            )
        self.value, self.adaptive, self.target, self.horizon = value, adaptive, target, horizon

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.adaptive:
            error = max(-0.2, min(0.2, current_kl / self.target - 1))
            self.value *= 1 + error * n_samples / self.horizon
        return self.value


class ProximalPolicy:
    def __init__(
        self,
        prompts: list[list[int]],
        reference: Transformer,
        reward_model: nn.Module,
        cfg: RLHFConfig,
        tokenizer: ChatTokenizer,
    ) -> None:
        if len(prompts) < 2:
            raise StageError(f"rlhf needs prompts; {paths.validated('preference')} gave {len(prompts)}")
        self.train_idx, self.val_idx = chat_data.split(len(prompts), 0.1, cfg.train.seed)
        self.prompts, self.reference, self.reward_model, self.cfg = prompts, reference, reward_model, cfg
        self.pad_id, self.stop = tokenizer.pad_id, [tokenizer.end_id, tokenizer.eos_id]
        self.kl = KLController(
            cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, int(getattr(cfg, "kl_horizon", KL_HORIZON_DEFAULT))
        )
        self.rollout: Batch | None = None
        self.rollout_step = -1
        self.rank = int(os.environ.get("RANK", "0"))
        self.cache_dir = paths.STATE / "rlhf"

    @property
    def kl_coef(self) -> float:
        return self.kl.value

    def cache(self, step: int) -> Path:
        return self.cache_dir / f"rollout-rank{self.rank}-step{step:08d}.safetensors"

    # ---------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def sample_responses(self, policy: Transformer, idx: list[int], seed: int, greedy: bool = False) -> Batch:
        """Generate one response per prompt; returns tokens [B,T], response mask in label space, lengths."""
        seqs, masks = [], []
        device = next(policy.parameters()).device
        for j, i in enumerate(idx):
            prompt = torch.tensor([self.prompts[i]], dtype=torch.long, device=device)
            gen = torch.Generator(device=device).manual_seed(seed * 1000 + j)
            out = generate(
                policy,
                prompt,
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=0.0 if greedy else self.cfg.temperature,
                top_k=self.cfg.top_k or None,
                stop_tokens=self.stop,
                pad_id=self.pad_id,
                generator=gen,
            )[0].tolist()
            response = out[len(self.prompts[i]) :]
            if self.pad_id in response:  # generate pads rows after their stop token
                response = response[: response.index(self.pad_id)]
            response = response or [self.stop[0]]
            seqs.append(self.prompts[i] + response)
            masks.append([False] * (len(self.prompts[i]) - 1) + [True] * len(response))
        tokens = chat_data.pad(seqs, self.pad_id)
        mask = chat_data.pad(masks, 0, fill=0)[:, : tokens.shape[1] - 1].float()
        return {"tokens": tokens, "mask": mask, "lengths": torch.tensor([len(s) for s in seqs])}

    @torch.no_grad()
    def score(self, batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"]
        self.reward_model.to(tokens.device)
        values = self.reward_model(tokens)  # [B, T]
        return last_token_values(values.float(), batch["lengths"].to(tokens.device))  # [B]

    def autocast(self, device: torch.device) -> torch.autocast:
        """The precision the loop computes the loss in (bf16 autocast on CPU), so that at the first PPO
        epoch the new/old ratio is exactly 1 and the KL to an identical reference exactly 0."""
        return torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=self.cfg.train.bf16 and device.type == "cpu"
        )

    @torch.no_grad()
    def make_rollout(self, model: PolicyWithValue, step: int) -> Batch:
        pick = chat_data.sample(
            len(self.train_idx), self.cfg.rollout_batch_size, self.cfg.train.seed, step, 0
        )
        batch = self.sample_responses(model.transformer, [int(self.train_idx[i]) for i in pick], seed=step)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens, mask = batch["tokens"], batch["mask"]
        self.reference.to(device)
        with self.autocast(device):
            logits, values = model(tokens[:, :-1])
            old_logps = token_logps(logits, tokens[:, 1:])  # [B, T-1]
            ref_logps = token_logps(self.reference(tokens[:, :-1]), tokens[:, 1:])
            scores = self.score(batch)  # [B]
        kl = (old_logps - ref_logps) * mask  # per-token KL estimate, [B, T-1]
        rewards = -self.kl.value * kl
        last = (batch["lengths"] - 2).clamp_min(0)  # label index of the last response token
        rewards[torch.arange(len(last)), last] += scores
        values = values.float() * mask
        advantages, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        advantages = masked_whiten(advantages, mask)
        out = {
            "tokens": tokens,
            "mask": mask,
            "old_logps": old_logps,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
            "scores": scores,
            "kl": kl.sum(-1),
        }
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        start = step - step % self.cfg.ppo_epochs
        if self.rollout_step != start:
            if self.rollout is None:
                self._on_first_batch(step, start)
            if step != start:  # resumed in the middle of a rollout's epochs: the weights moved since
                self.rollout = self._load(start)
                self.kl.value = float(self.rollout.pop("kl_coef_after"))
                log.info("resumed on the cached rollout of step %d (%s)", start, self.cache(start))
            else:
                self.rollout = self.make_rollout(model, start)  # type: ignore[arg-type]
                kl_after = self.kl.update(float(self.rollout["kl"].mean()), int(self.rollout["kl"].numel()))
                tensors = {k: v.contiguous() for k, v in self.rollout.items()}
                tensors["kl_coef_after"] = torch.tensor(kl_after, dtype=torch.float64)
                atomic_write_bytes(self.cache(start), save(tensors))
            self.rollout_step = start
        assert self.rollout is not None
        return dict(self.rollout)

    def _load(self, step: int) -> Batch:
        path = self.cache(step)
        if not path.exists():
            raise StageError(f"resuming PPO at a rollout of step {step}, but its cache {path} is missing")
        return load_file(str(path))

    def _on_first_batch(self, step: int, start: int) -> None:
        """A fresh run drops rollouts of an earlier attempt; a resumed one restores the KL coefficient."""
        if step == 0:
            for old in self.cache_dir.glob(f"rollout-rank{self.rank}-step*.safetensors"):
                old.unlink()
        elif start > 0:  # the coefficient after the previous rollout's update, used by this new one
            self.kl.value = float(self._load(start - self.cfg.ppo_epochs)["kl_coef_after"])

    def rollout_kls(self) -> dict[int, float]:
        """Mean KL of every rollout of this run so far, by the step that made it (from the cache)."""
        out = {}
        for path in sorted(self.cache_dir.glob(f"rollout-rank{self.rank}-step*.safetensors")):
            out[int(path.stem.rsplit("step", 1)[1])] = float(load_file(str(path))["kl"].mean())
        return out

    def kl_alerts(self, max_kl: float) -> list[str]:
        over = {s: kl for s, kl in self.rollout_kls().items() if kl > max_kl}
        if not over:
            return []
        step, kl = max(over.items(), key=lambda item: item[1])
        return [
            f"PPO KL {kl:.3f} (rollout of step {step}) > alerts.ppo_max_kl {max_kl} "
            f"in {len(over)} rollout(s): the policy drifts from the SFT reference"
        ]

    # ---------------------------------------------------------------------------------- PPO loss
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, mask = batch["tokens"], batch["mask"]
        logits, values = model(tokens[:, :-1])
        new_logps = token_logps(logits, tokens[:, 1:])
        pg_loss, vf_loss, clipfrac = ppo_losses(
            new_logps,
            batch["old_logps"],
            batch["advantages"],
            values.float(),
            batch["old_values"],
            batch["returns"],
            mask,
            clip_range=self.cfg.clip_range,
            clip_range_value=self.cfg.clip_range_value,
        )
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)
            entropy = masked_mean(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1), mask)
            approx_kl = masked_mean(0.5 * (new_logps - batch["old_logps"]) ** 2, mask)
        loss = pg_loss + self.cfg.value_loss_coef * vf_loss
        return loss, {
            "reward/mean": float(batch["scores"].mean()),
            "kl": float(batch["kl"].mean()),
            "kl_coef": self.kl.value,
            "entropy": float(entropy),
            "policy/clipfrac": float(clipfrac),
            "policy/approxkl": float(approx_kl),
            "loss/policy": float(pg_loss.detach()),
            "loss/value": float(vf_loss.detach()),
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Reward-model score of responses to held-out prompts, sampled as rollouts are (same temperature)
        with fixed seeds: the expected reward PPO maximises, comparable from one evaluation to the next.
        (Greedy decoding would score one degenerate response per prompt of a small model, not the policy.)"""
        n = max(1, self.cfg.train.eval_batches * self.cfg.rollout_batch_size)
        idx = [int(i) for i in self.val_idx[:n]]
        batch = self.sample_responses(model.transformer, idx, seed=EVAL_SEED)  # type: ignore[arg-type]
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = self.score(batch)
        return {
            "val/reward_mean": float(scores.mean()),
            "val/response_tokens": float(batch["mask"].sum(-1).float().mean()),
        }

    def tokens_in(self, batch: Batch) -> int:
        return int(batch["tokens"].numel())


def load_prompts(tokenizer: ChatTokenizer, cfg: RLHFConfig, max_seq_len: int) -> list[list[int]]:
    room = max_seq_len - cfg.max_new_tokens
    if room < 8:
        raise StageError(
            f"rlhf.max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in {max_seq_len}"
        )
    prompts = []
    for row in chat_data.read_rows("preference"):
        ids, _ = tokenizer.render_chat(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True
        )
        if len(ids) <= room:
            prompts.append(ids)
    return prompts


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.rlhf
    tokenizer = ChatTokenizer.load(paths.TOKENIZER_JSON)
    reference_name = str(getattr(cfg, "reference", "sft"))
    sft, _ = load_causal_lm(reference_name, tokenizer.fingerprint)
    reference, _ = load_causal_lm(reference_name, tokenizer.fingerprint)
    check_same_architecture(sft, reference, (reference_name, reference_name))
    reward_model, _ = load_stage_model("reward", tokenizer.fingerprint, kind="scalar_head")
    reward_config = reward_model.config
    if (
        reward_config.vocab_size != sft.config.vocab_size
        or reward_config.max_seq_len < sft.config.max_seq_len
    ):
        raise StageError(
            f"reward model {paths.checkpoint('reward')} (vocab {reward_config.vocab_size}, context "
            f"{reward_config.max_seq_len}) cannot score the policy's sequences (vocab {sft.config.vocab_size}, "
            f"context {sft.config.max_seq_len}); re-run the reward stage on this SFT model"
        )
    reference.requires_grad_(False)
    reward_model.requires_grad_(False)
    torch.manual_seed(cfg.train.seed)
    model = PolicyWithValue(sft)
    objective = ProximalPolicy(
        load_prompts(tokenizer, cfg, sft.config.max_seq_len), reference, reward_model, cfg, tokenizer
    )
    # The starting policy's held-out reward, measured as every later evaluation is: the baseline that
    # val/reward_mean is compared with (metrics: val/reward_mean_initial).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    with torch.no_grad(), objective.autocast(device):
        initial = objective.evaluate(model)["val/reward_mean"]
    log.info("before PPO: val/reward_mean=%.4g (the %s policy)", initial, reference_name)

    def value_head_dropped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Downstream stages need a causal LM: the value head is training scaffolding and is dropped.
        policy = PolicyWithValue(Transformer(sft.config))
        policy.load_state_dict(state)
        return policy.transformer.state_dict()

    return train_stage(
        "rlhf",
        model,
        objective,
        cfg.train,
        tracker=tracker,
        checkpoint_model=Transformer(sft.config),
        config=sft.config,
        tokenizer_fingerprint=tokenizer.fingerprint,
        parent=reference_name,
        on_step=alerts_at_end(
            cfg.train.max_steps, lambda _: objective.kl_alerts(params.alerts.ppo_max_kl), params, tracker
        ),
        extra_metrics={"val/reward_mean_initial": initial},
        weights_to_save=value_head_dropped,
    )


if __name__ == "__main__":
    training_main("rlhf", run, lambda params: params.rlhf.train)
