"""Reward-model win rate of a chat policy against a reference (the SFT model) on held-out prompts.

Each policy and the reference answer every prompt greedily (stop at <|end|>/<|eos|>, max_new_tokens); the
reward model scores prompt + response at its last token; the policy wins a prompt when its reward is
higher, a tie (same response, or equal reward) counts 0.5. The reference against itself is exactly 0.5.
`setup` builds the evaluate stage's harness: the held-out prompts (`heldout_rows`: rows no preference stage
trained on), the reward model and the SFT reference.

Given the prompts' true answers (`references`: the preference rows' chosen text), the same greedy responses
are also scored against them with no model at all (tasks/eval/similarity.py: `answer_f1`, token F1, and
`answer_rouge_l`): a check of the win rate that the training reward model cannot sway.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.adapters import weights_sha256
from tasks.core import paths, stages
from tasks.core.config import Params
from tasks.core.io import sha256_file
from tasks.core.stage import StageError
from tasks.data import chat_data
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.eval.models import check_vocab, load_lm
from tasks.eval.similarity import answer_similarity
from tasks.train.rollouts import greedy_responses, score_responses, score_with_reward_model

log = logging.getLogger(__name__)

POLICIES = tuple(stages.chat_policies())  # the models that get a win rate against the SFT reference
WINRATE_BATCH = 8  # prompts generated / scored together


def win_rate(
    policy_responses: Sequence[list[int]],
    policy_rewards: Sequence[float],
    reference_responses: Sequence[list[int]],
    reference_rewards: Sequence[float],
) -> dict[str, Any]:
    """1 per prompt where the policy's reward is higher, 0 where lower, 0.5 on a tie; an identical response
    is a tie by definition (whatever rounding a different batch might give its reward)."""
    wins = []
    for pr, p, rr, r in zip(
        policy_responses, policy_rewards, reference_responses, reference_rewards, strict=True
    ):
        wins.append(0.5 if pr == rr or p == r else float(p > r))
    n = len(wins)
    return {
        "winrate": sum(wins) / n if n else float("nan"),
        "n_prompts": n,
        "n_identical": sum(a == b for a, b in zip(policy_responses, reference_responses, strict=True)),
        "reward_mean": sum(policy_rewards) / n if n else float("nan"),
        # TRL's name; tokens of the greedy response, its stop token included
        "completions/mean_length": sum(map(len, policy_responses)) / n if n else float("nan"),
        "reference_reward_mean": sum(reference_rewards) / n if n else float("nan"),
        "wins": wins,
    }


class WinRate:
    """Held-out prompts, the reward model and the reference's responses and rewards, computed once."""

    def __init__(
        self,
        prompts: list[list[int]],
        rows: list[int],
        reward_model: Any,
        reference: Any,
        tokenizer: ChatTokenizer,
        max_new_tokens: int,
        protocol: dict[str, Any],
        references: list[str] | None = None,
    ) -> None:
        if references is not None and len(references) != len(prompts):
            raise ValueError(f"{len(references)} reference answers for {len(prompts)} prompts")
        self.references = references
        self.prompts, self.rows, self.reward_model, self.tokenizer = prompts, rows, reward_model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = [tokenizer.end_id, tokenizer.eos_id]
        self.reference_responses = self._responses(reference)
        self.reference_rewards = self._rewards(self.reference_responses)
        self.protocol = protocol

    def _responses(self, model: Any) -> list[list[int]]:
        return greedy_responses(
            model, self.prompts, self.max_new_tokens, self.stop, self.tokenizer.pad_id, WINRATE_BATCH
        )

    def _rewards(self, responses: list[list[int]]) -> list[float]:
        device = next(self.reward_model.parameters()).device
        reward_fn = functools.partial(score_with_reward_model, self.reward_model)
        return score_responses(
            reward_fn, self.prompts, responses, self.tokenizer.pad_id, device, WINRATE_BATCH
        )

    def evaluate(self, name: str, policy: Any) -> dict[str, Any]:
        start = time.time()
        responses = self._responses(policy)
        rewards = self._rewards(responses)
        res = win_rate(responses, rewards, self.reference_responses, self.reference_rewards)
        log.info(
            "%s: win rate vs sft %.3f on %d held-out prompts (%d identical responses, %.1fs)",
            name,
            res["winrate"],
            res["n_prompts"],
            res["n_identical"],
            time.time() - start,
        )
        texts = [self.tokenizer.decode(resp) for resp in responses]
        res["per_prompt"] = [
            {"row": row, "reward": r, "reference_reward": rr, "win": w, "response": text, "tokens": len(resp)}
            for row, r, rr, w, text, resp in zip(
                self.rows, rewards, self.reference_rewards, res.pop("wins"), texts, responses, strict=True
            )
        ]
        if self.references is not None:
            similar = answer_similarity(texts, self.references)
            res["answer_f1"], res["answer_rouge_l"] = similar.answer_f1, similar.answer_rouge_l
            for item, f1, rl in zip(res["per_prompt"], similar.f1, similar.rouge_l, strict=True):
                item["answer_f1"], item["answer_rouge_l"] = f1, rl
            log.info(
                "%s: answers vs the true ones: token F1 %.3f, ROUGE-L %.3f",
                name,
                res["answer_f1"],
                res["answer_rouge_l"],
            )
        return res


def protocol(
    rows: list[int],
    how: str,
    n_held_out: int,
    n_prompts: int,
    room: int,
    max_new_tokens: int,
    tokenizer: ChatTokenizer,
    checkpoints: dict[str, Path],
    preference: Path,
) -> dict[str, Any]:
    """What a win rate measured, recorded next to it: the prompts (rows and how they were chosen), decoding,
    scoring and the sha256 of the reward and reference checkpoints and of the preference data."""
    return {
        "reference": "sft",
        "prompts": f"data/validated/preference.parquet rows held out from training ({how}), first "
        f"{n_prompts} whose chat prompt fits max_seq_len - max_new_tokens = {room} tokens",
        "rows": rows,
        "n_held_out": n_held_out,
        "prompt_format": "render_chat([user: prompt], add_generation_prompt=True)",
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "stop_tokens": [tokenizer.specials.end, tokenizer.specials.eos],
        "score": "reward model (scalar head) value at the last token of prompt + response",
        "win": "policy reward > reference reward: 1; equal reward or identical response: 0.5; else 0",
        "answer_similarity": "answer_f1 (token F1) and answer_rouge_l (ROUGE-L F1) of each greedy response "
        "against the row's chosen answer, on lower-cased letter/digit words (tasks/eval/similarity.py)",
        "reward_checkpoint_sha256": weights_sha256(checkpoints["reward"]),
        "reference_checkpoint_sha256": weights_sha256(checkpoints["reference"]),
        "preference_sha256": sha256_file(preference),
    }


# ----------------------------------------------- the evaluate stage's harness: held-out prompts, models
def heldout_rows(
    params: Params, prompt_lengths: Sequence[int], max_seq_len: int, groups: Sequence[str] | None = None
) -> tuple[list[int], str]:
    """Preference rows that none of reward, dpo and rlhf trained on: the intersection of their held-out
    splits (reward and dpo split every row, as chat_data.split(n, val_fraction, seed, groups); rlhf's split
    is chat_data.rlhf_split, which the rlhf stage itself calls). `groups`: the rows' chat_data.pair_groups,
    by which the stages split (None: by row). Falls back to the reward stage's held-out split, with a note,
    if the intersection is empty (different seeds or fractions per stage)."""
    n = len(prompt_lengths)
    reward_val = set(
        chat_data.split(n, params.reward.val_fraction, params.reward.train.seed, groups)[1].tolist()
    )
    dpo_val = set(chat_data.split(n, params.dpo.val_fraction, params.dpo.train.seed, groups)[1].tolist())
    rlhf_val = set(chat_data.rlhf_split(params.rlhf, prompt_lengths, max_seq_len, groups)[1])
    both = sorted(reward_val & dpo_val & rlhf_val)
    if both:
        return both, "intersection of the reward, dpo and rlhf held-out splits"
    log.warning("the reward, dpo and rlhf held-out splits share no prompt; using the reward stage's split")
    return sorted(reward_val), "reward stage held-out split (dpo/rlhf held-out splits do not intersect it)"


def setup(params: Params, tokenizer: ChatTokenizer, names: list[str], device: str) -> WinRate | None:
    """The win-rate harness, or None (with the reason logged) when a piece is missing."""
    cfg = params.evaluate
    reward_dir, sft_dir, pref = (
        paths.checkpoint("reward"),
        paths.checkpoint("sft"),
        paths.validated("preference"),
    )
    missing = [str(p) for p in (reward_dir / "config.json", sft_dir / "config.json", pref) if not p.is_file()]
    if missing or not any(n in POLICIES for n in names) or cfg.winrate_prompts <= 0:
        log.warning(
            "no reward-model win rate: %s", f"missing {missing}" if missing else "no policy / 0 prompts"
        )
        return None
    from models.checkpoint import load_checkpoint

    reward_model: Any
    reward_model, reward_meta = load_checkpoint(reward_dir, kind="scalar_head")
    check_vocab(reward_model.config.vocab_size, tokenizer, str(reward_dir))
    if reward_meta.get("tokenizer_fingerprint"):
        tokenizer.check_fingerprint(reward_meta["tokenizer_fingerprint"], str(reward_dir))
    reference: Any
    reference, _ = load_lm(sft_dir, tokenizer)
    max_seq_len = min(reference.config.max_seq_len, reward_model.config.max_seq_len)
    room = max_seq_len - cfg.max_new_tokens
    if room < 1:
        raise StageError(
            f"evaluate.max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in {max_seq_len}"
        )
    preference_rows, rendered, groups = chat_data.preference_prompts(tokenizer)
    rows, how = heldout_rows(params, [len(p) for p in rendered], reference.config.max_seq_len, groups)
    fit = [i for i in rows if len(rendered[i]) <= room]
    rows = fit[: cfg.winrate_prompts]
    if not rows:
        log.warning("no reward-model win rate: no held-out prompt fits %d tokens", room)
        return None
    recorded = protocol(
        rows,
        how,
        len(fit),
        cfg.winrate_prompts,
        room,
        cfg.max_new_tokens,
        tokenizer,
        {"reward": reward_dir, "reference": sft_dir},
        pref,
    )
    start = time.time()
    harness = WinRate(
        [rendered[i] for i in rows],
        rows,
        reward_model.float().eval().to(device),
        reference.to(device),
        tokenizer,
        cfg.max_new_tokens,
        recorded,
        references=[preference_rows[i]["chosen"] for i in rows],
    )
    log.info(
        "win rate: %d held-out prompts, reference answered and scored in %.1fs",
        len(rows),
        time.time() - start,
    )
    return harness
