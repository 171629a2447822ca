"""Packing on CPU: which attention for packed rows, and what packing buys SFT and DPO.

Part 1, attention for packed rows (forward + backward of one attention call, the shapes of the cpu profile:
B rows of T tokens, H heads of Hd, documents of the SFT conversations' lengths packed greedily):
- dense: SDPA with the bool block-diagonal causal mask [B,1,T,T] (what models/llama.py does with doc_ids);
- causal_no_docs: SDPA is_causal over whole rows, NOT per document (wrong for packing: the floor to beat);
- per_doc_split: the rows flattened and split at document boundaries, SDPA is_causal per document;
- per_doc_padded: the documents gathered into a [n_docs, H, L_max, Hd] batch, SDPA is_causal, scattered back;
- flex: torch.nn.attention.flex_attention with a document block mask (tried; recorded if it cannot train).
Each variant's max |difference| from dense is recorded (float32) and must be ~0.

Part 2, training steps (model of the cpu profile's shape, random weights, bf16 autocast as the profiles
train on CPU, AdamW): SFT real tokens/s padded vs packed (sft.packing), DPO pairs/s padded vs packed
(dpo.packing), on the SFT conversations / preference pairs of a pipeline workspace (--workspace, one that
has data/validated and data/tokenizer) or of the tiny test workspace.

Variants alternate round by round; median and spread (min, max) of the rounds are reported with the load
average and CPU model.

    .venv/bin/python benchmarks/packing.py [--workspace DIR] [--rounds 3] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402


def summary(times: list[float], scale: float = 1.0) -> dict[str, float]:
    values = [scale / t for t in times] if scale != 1.0 else times
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, in turn (so slow phases of a shared machine hit all of them)."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            out[name].append(fn())
    return out


# ------------------------------------------------------------------------------------ part 1: attention
def attention_part(doc_lengths: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    B, T, H, Hd = len(doc_lengths), args.seq_len, 4, 64
    doc_ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in doc_lengths])
    lens = torch.tensor([n for row in doc_lengths for n in row])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def dense(q, k, v):  # [B, H, T, Hd]
        mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # [B, 1, T, T]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def causal_no_docs(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def per_doc_split(q, k, v):
        def flat(x):  # [B, H, T, Hd] -> [1, H, B*T, Hd], split along the flattened tokens
            return x.transpose(0, 1).reshape(1, H, B * T, Hd).split(lens.tolist(), dim=2)

        parts = [
            F.scaled_dot_product_attention(a, b, c, is_causal=True)
            for a, b, c in zip(flat(q), flat(k), flat(v), strict=True)
        ]
        return torch.cat(parts, dim=2).reshape(H, B, T, Hd).transpose(0, 1)

    L = int(lens.max())
    pos = torch.arange(L)[None, :]
    valid = pos < lens[:, None]  # [n_docs, L]
    src = (offsets[:-1, None] + pos).clamp(max=B * T - 1)  # [n_docs, L] index into the B*T tokens

    def per_doc_padded(q, k, v):
        def gather(x):  # -> [n_docs, H, L, Hd]
            return x.transpose(1, 2).reshape(B * T, H, Hd)[src].transpose(1, 2)

        y = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), is_causal=True)
        return y.transpose(1, 2)[valid].reshape(B, T, H, Hd).transpose(1, 2)

    fns = {
        "dense": dense,
        "causal_no_docs": causal_no_docs,
        "per_doc_split": per_doc_split,
        "per_doc_padded": per_doc_padded,
    }
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"shape": {"B": B, "T": T, "H": H, "Hd": Hd, "docs": int(lens.numel())}}

    # flex_attention: tried once; on CPU torch 2.13 has no backward for it (training needs one)
    q32 = [torch.randn(B, H, T, Hd, generator=g, requires_grad=True) for _ in range(3)]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def doc_causal(b, h, qi, ki):
            return (doc_ids[b, qi] == doc_ids[b, ki]) & (qi >= ki)

        block_mask = create_block_mask(doc_causal, B, None, T, T, device="cpu")
        flex_attention(*q32, block_mask=block_mask).sum().backward()
        out["flex"] = "trains on this CPU (not timed here)"
    except Exception as exc:  # recorded, not fatal: the point of trying
        out["flex"] = f"cannot train: {type(exc).__name__}: {str(exc)[:160]}"

    ref = dense(*q32)
    out["max_abs_diff_vs_dense_fp32"] = {
        name: float((fn(*q32) - ref).abs().max()) for name, fn in fns.items() if name != "dense"
    }
    for dtype in (torch.bfloat16, torch.float32):
        qkv = [torch.randn(B, H, T, Hd, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]

        def timed(fn: Callable, qkv: list = qkv) -> Callable[[], float]:
            def run() -> float:
                t0 = time.perf_counter()
                for _ in range(args.attn_reps):
                    fn(*qkv).float().sum().backward()
                return (time.perf_counter() - t0) / args.attn_reps * 1000

            return run

        for fn in fns.values():  # warm-up
            timed(fn)()
        times = alternate({name: timed(fn) for name, fn in fns.items()}, args.rounds)
        out[f"fwd_bwd_ms_{str(dtype).split('.')[1]}"] = {name: summary(t) for name, t in times.items()}
    return out


# -------------------------------------------------------------------------------- part 2: training steps
def model_for(vocab: int, seq_len: int) -> Any:
    import torch

    from models.config import ModelConfig
    from models.llama import Transformer

    torch.manual_seed(0)  # the cpu profile's shape
    return Transformer(
        ModelConfig(
            vocab_size=-(-vocab // 64) * 64,
            n_layer=4,
            n_head=4,
            n_kv_head=2,
            d_model=256,
            max_seq_len=seq_len,
        )
    )


def steps_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from models.llama import optimizer_groups
    from tasks.core import paths
    from tasks.core.config import DPOConfig
    from tasks.data import chat_data
    from tasks.data.chat_tokenizer import ChatTokenizer
    from tasks.dpo import DirectPreference
    from tasks.sft import SupervisedChat
    from tasks.train.mfu import measure_matmul_tflops

    tok = ChatTokenizer.load(paths.TOKENIZER_JSON)
    examples = chat_data.sft_examples(tok, args.seq_len)
    pairs = chat_data.preference_pairs(tok, args.seq_len)
    model = model_for(tok.vocab_size, args.seq_len)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.1), lr=1e-4)
    objectives = {
        "sft_padded": SupervisedChat(examples, tok.pad_id, args.sft_batch, 1337, 0.1, 1),
        "sft_packed": SupervisedChat(
            examples, tok.pad_id, args.sft_batch, 1337, 0.1, 1, packing=True, seq_len=args.seq_len
        ),
    }
    ref = torch.zeros(len(pairs), 2)  # the reference log-probs do not change the cost of a step
    objectives["dpo_padded"] = DirectPreference(pairs, ref, DPOConfig(), tok.pad_id)
    objectives["dpo_packed"] = DirectPreference(pairs, ref, DPOConfig(), tok.pad_id, args.seq_len)
    step_no = {name: 0 for name in objectives}
    flops = model.flops_per_token(args.seq_len)

    def step_fn(name: str) -> Callable[[], float]:
        objective = objectives[name]

        def run() -> float:  # args.steps optimizer steps -> units per second (tokens or pairs)
            units, elapsed = 0.0, 0.0
            for _ in range(args.steps):
                batch = objective.batch(step_no[name], 0, model)
                step_no[name] += 1
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = objective.loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                elapsed += time.perf_counter() - t0
                units += objective.tokens_in(batch) if name.startswith("sft") else len(batch["ref"])
            return units / elapsed

        return run

    for name in objectives:  # warm-up
        step_fn(name)()
    rates = alternate({name: step_fn(name) for name in objectives}, args.rounds)
    peak = measure_matmul_tflops(torch.device("cpu"), torch.bfloat16)
    out: dict[str, Any] = {
        "sft_batch": args.sft_batch,
        "dpo_batch": DPOConfig().train.micro_batch_size,
        "steps_per_round": args.steps,
        "bf16_peak_tflops": round(peak, 3),
    }
    for name, values in rates.items():
        unit = "tokens_per_s" if name.startswith("sft") else "pairs_per_s"
        out[name] = {unit: summary(values)}
        if name.startswith("sft"):  # MFU as the loop computes it: real tokens x 6N+attention / peak
            out[name]["mfu_median"] = round(statistics.median(values) * flops / (peak * 1e12), 3)
    out["sft_packed_vs_padded"] = round(
        statistics.median(rates["sft_packed"]) / statistics.median(rates["sft_padded"]), 2
    )
    out["dpo_packed_vs_padded"] = round(
        statistics.median(rates["dpo_packed"]) / statistics.median(rates["dpo_padded"]), 2
    )
    # what packing saves: slots (rows x width) per real token, one batch of each
    sft = {n: objectives[n].batch(0, 0, model) for n in ("sft_padded", "sft_packed")}
    dpo = {n: objectives[n].batch(0, 0, model) for n in ("dpo_padded", "dpo_packed")}
    out["slots_per_real_token"] = {
        n: round(b["x"].numel() / objectives[n].tokens_in(b), 2) for n, b in sft.items()
    } | {
        "dpo_padded": round(dpo["dpo_padded"]["tokens"].numel() / int(dpo["dpo_padded"]["lengths"].sum()), 2),
        "dpo_packed": round(dpo["dpo_packed"]["x"].numel() / int(dpo["dpo_packed"]["lengths"].sum()), 2),
    }
    return out


def packed_doc_lengths(args: argparse.Namespace) -> list[list[int]]:
    """Document lengths of sft_batch packed rows of the workspace's SFT conversations."""
    import numpy as np

    from tasks.core import paths
    from tasks.data import chat_data
    from tasks.data.chat_tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(paths.TOKENIZER_JSON)
    examples = chat_data.sft_examples(tok, args.seq_len)
    order = np.random.default_rng(0).permutation(len(examples))
    rows = chat_data.pack([examples[i] for i in order], args.seq_len)[: args.sft_batch]
    lengths = []
    for row in rows:
        doc = row.doc[: args.seq_len] + [-1] * (args.seq_len - len(row.doc[: args.seq_len]))
        runs: list[int] = []  # lengths of the runs of equal id, in order (a trailing pad: one more run)
        for i, d in enumerate(doc):
            if i == 0 or d != doc[i - 1]:
                runs.append(0)
            runs[-1] += 1
        lengths.append(runs)
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workspace", type=Path, help="a pipeline workspace (data/validated, data/tokenizer)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per variant per round")
    parser.add_argument("--attn-reps", type=int, default=3)
    parser.add_argument("--sft-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-steps", action="store_true", help="part 1 only")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        if args.workspace:
            os.chdir(args.workspace.resolve())
        else:
            from tests.helpers.workspace import make_workspace

            make_workspace(Path(tmp), pairs=128)
            os.chdir(tmp)
        result: dict[str, Any] = {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "data": "workspace" if args.workspace else "tiny test workspace",
            "rounds": args.rounds,
            "attention": attention_part(packed_doc_lengths(args), args),
        }
        if not args.skip_steps:
            result["steps"] = steps_part(args)
    result["load_avg_1m"] = {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
