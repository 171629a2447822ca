"""Stage `rlhf`: PPO on prompts, policy and value from the SFT model, reward from the reward model.

Every `ppo_epochs` optimizer steps the current policy samples a rollout batch; in between it is
optimised on that rollout (clipped surrogate + clipped value loss). Per-token rewards are the KL penalty
to the frozen SFT reference, plus the reward model's score on the last response token; advantages by GAE.
Rollouts are saved in the state dir, so a resumed run continues on exactly the rollout it was using.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.generate import generate
from models.heads import PolicyWithValue, last_token_values
from models.llama import Transformer
from tasks import chat_data, paths
from tasks.config import Params, RLHFConfig
from tasks.dpo import raise_or_tag
from tasks.losses import gae, masked_mean, masked_whiten, ppo_losses, token_logps
from tasks.stage import StageError, stage_main
from tasks.tokens import ChatTokenizer
from tasks.training import Batch, finish_training, load_causal_lm, load_stage_model, train

log = logging.getLogger(__name__)


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
        self.kl_coef = cfg.kl_coef
        self.rollout: Batch | None = None
        self.rollout_step = -1
        self.rank = int(os.environ.get("RANK", "0"))
        self.cache = paths.STATE / "rlhf" / f"rollout-rank{self.rank}.safetensors"

    # ---------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def sample_responses(self, policy: Transformer, idx: list[int], seed: int, greedy: bool = False) -> Batch:
        """Generate one response per prompt; returns tokens [B,T], response mask in label space, lengths."""
        seqs, masks = [], []
        for j, i in enumerate(idx):
            prompt = torch.tensor([self.prompts[i]], dtype=torch.long)
            gen = torch.Generator().manual_seed(seed * 1000 + j)
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
        values = self.reward_model(batch["tokens"])  # [B, T]
        return last_token_values(values.float(), batch["lengths"])  # [B]

    @torch.no_grad()
    def make_rollout(self, model: PolicyWithValue, step: int) -> Batch:
        pick = chat_data.sample(
            len(self.train_idx), self.cfg.rollout_batch_size, self.cfg.train.seed + self.rank, step, 0
        )
        batch = self.sample_responses(model.transformer, [int(self.train_idx[i]) for i in pick], seed=step)
        tokens, mask = batch["tokens"], batch["mask"]
        logits, values = model(tokens[:, :-1])
        old_logps = token_logps(logits, tokens[:, 1:])  # [B, T-1]
        ref_logps = token_logps(self.reference(tokens[:, :-1]), tokens[:, 1:])
        scores = self.score(batch)  # [B]
        kl = (old_logps - ref_logps) * mask  # per-token KL estimate, [B, T-1]
        rewards = -self.kl_coef * kl
        last = (batch["lengths"] - 2).clamp_min(0)  # label index of the last response token
        rewards[torch.arange(len(last)), last] += scores
        values = values.float() * mask
        advantages, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        advantages = masked_whiten(advantages, mask)
        return {
            "tokens": tokens,
            "mask": mask,
            "old_logps": old_logps,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
            "scores": scores,
            "kl": kl.sum(-1),
        }

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        start = step - step % self.cfg.ppo_epochs
        if self.rollout_step != start:
            if step != start and self.cache.exists():  # resumed in the middle of a rollout's epochs
                self.rollout = load_file(str(self.cache))
            else:
                self.rollout = self.make_rollout(model, start)  # type: ignore[arg-type]
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in self.rollout.items()}, str(self.cache))
                self.update_kl_coef(float(self.rollout["kl"].mean()))
            self.rollout_step = start
        assert self.rollout is not None
        return dict(self.rollout)

    def update_kl_coef(self, kl: float) -> None:
        """Adaptive KL controller (Ziegler et al. 2019): move kl_coef so the KL tracks target_kl."""
        if self.cfg.adaptive_kl:
            error = max(-0.2, min(0.2, kl / self.cfg.target_kl - 1))
            self.kl_coef *= 1 + error * self.cfg.rollout_batch_size / 10_000

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
            "kl_coef": self.kl_coef,
            "entropy": float(entropy),
            "policy/clipfrac": float(clipfrac),
            "policy/approxkl": float(approx_kl),
            "loss/policy": float(pg_loss.detach()),
            "loss/value": float(vf_loss.detach()),
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy responses on held-out prompts, scored by the reward model."""
        idx = [int(i) for i in self.val_idx[: self.cfg.train.eval_batches * 4]]
        batch = self.sample_responses(model.transformer, idx, seed=0, greedy=True)  # type: ignore[arg-type]
        return {"val/reward_mean": float(self.score(batch).mean())}

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
    sft, _ = load_causal_lm("sft", tokenizer.fingerprint)
    reference, _ = load_causal_lm("sft", tokenizer.fingerprint)
    reward_model, _ = load_stage_model("reward", tokenizer.fingerprint, kind="scalar_head")
    if reference.config != reward_model.config:
        raise StageError(
            f"policy/reference config {sft.config} and reward model config {reward_model.config} differ"
        )
    reference.requires_grad_(False)
    reward_model.requires_grad_(False)
    torch.manual_seed(cfg.train.seed)
    model = PolicyWithValue(sft)
    objective = ProximalPolicy(
        load_prompts(tokenizer, cfg, sft.config.max_seq_len), reference, reward_model, cfg, tokenizer
    )
    state, metrics = train(
        model,
        objective,
        cfg.train,
        state_dir=paths.STATE / "rlhf",
        tracker=tracker,
        plot_csv=paths.PLOTS / "rlhf.csv",
    )
    kl = metrics.get("kl", 0.0)
    found = (
        [f"PPO KL {kl:.3f} > alerts.ppo_max_kl {params.alerts.ppo_max_kl}"]
        if kl > params.alerts.ppo_max_kl
        else []
    )
    raise_or_tag(found, params, tracker)
    # Downstream stages need a causal LM: the value head is training scaffolding and is dropped.
    policy = PolicyWithValue(Transformer(sft.config))
    policy.load_state_dict(state)
    return finish_training(
        "rlhf",
        Transformer(sft.config),
        policy.transformer.state_dict(),
        sft.config,
        metrics,
        meta={"tokenizer_fingerprint": tokenizer.fingerprint, "stage": "rlhf", "parent": "sft"},
        out_dir=paths.checkpoint("rlhf"),
    )


if __name__ == "__main__":
    stage_main("rlhf", run)
