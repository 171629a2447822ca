"""Ready for a GPU: one run measuring the gpu profile's model (conf/profiles/gpu.yaml) on one CUDA device.

Run it as `bash benchmarks/gpu.sh` (this file behind a thin wrapper). The model is the gpu profile's, read
through tasks.core.config.resolve_params("gpu") (12 layers, d_model 768, 12 heads / 4 kv heads, context
1024, vocab = tokenizer.vocab_size 32768 rounded up to a multiple of 64, as tasks/pretrain.py sizes it).
The parts, in this order, each reusing a benchmark's own functions by import:

- pretrain: tokens/s and MFU of our loop (tasks.train.loop.train through benchmarks/pretrain.py our_loop:
  DeepSpeed engine, bf16, the profile's zero_stage 2 (on one process the loop runs stage 0, recorded),
  micro-batch 32 x 1024 (profile), grad_accum 1), attention forced onto the SDPA flash kernel
  (torch.nn.attention.sdpa_kernel(FLASH_ATTENTION): a shape or dtype flash cannot take fails the part);
  5 warm-up + 30 measured steps;
- dpo: pairs/s of the DPO objective through our loop (benchmarks/posttrain.py setup / worker, impl
  loop_bf16), the profile's dpo micro-batch 8 and zero_stage 2, pairs filling dpo.seq_len 1024 (prompt
  and responses of about half the context each); 3 warm-up + 20 measured steps;
- mmlu: items/s of tasks.eval.mmlu.score_items (5-shot, batch 16 as tasks/evaluate.py, fp32 as evaluate
  runs it) on 8 x 32 generated items (random words, real MMLU lengths: ~720 context tokens), tokenizer from
  benchmarks/eval.py train_tokenizer; one warm-up pass, best of 2;
- generation: tokens/s of models.generate.generate_batch with the batched KV cache (benchmarks/generation.py
  batched: per-row seeded sampling, temperature 1, top-k 50), bf16, 64 prompts of 64..512 tokens,
  256 new tokens; one warm-up, median of 3 rounds;
- pretrain_compiled: the pretrain part with train.compile=true (DeepSpeed engine.compile(), inductor),
  default SDPA dispatch; 5 warm-up (compilation) + 30 measured steps. Last, so a slow compile cannot eat
  the other parts' time.

MFU = model FLOPs (Transformer.flops_per_token) / the bf16 matmul peak measured at the start of this run
(tasks.train.mfu.measure_matmul_tflops, 8192^3, best of 10), the same peak the loop's logged MFU uses.

Time boxes: each part runs under an alarm (pretrain 60 s, dpo 75 s, mmlu 45 s, generation 45 s,
pretrain_compiled 240 s) and never past a 440 s deadline for the whole run, so with start-up the run ends
within 8 minutes on an H100/H200. A part that fails or runs out of time is recorded with its error
string; the others still run. A part stuck inside one call the alarm cannot interrupt: 20 s after its box a
watchdog prints the JSON so far (that part and the ones not reached marked) and exits. Prints one JSON object on stdout (progress and library logs go to stderr):
device, torch / CUDA / DeepSpeed versions, the peak, the shapes, and per part its figure, step counts and
wall seconds. Exit status 0 when every part produced its figure, 1 otherwise.

    bash benchmarks/gpu.sh              # on a CUDA machine; without one it refuses (exit 2)
    bash benchmarks/gpu.sh --dry-run    # CPU or GPU: tiny shapes, 1-2 steps, the same code paths
                                        # (torch.compile skipped on CPU, the reason recorded)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEADLINE_S = 440.0  # the parts end by then (start-up ~20 s): inside 8 minutes
HANG_GRACE_S = 20.0  # a part still running this long after its box: print what is done and exit
# name: (time box in seconds, warm-up steps, measured steps) for the GPU run
GPU_STEPS = {
    "pretrain": (60, 5, 30),
    "dpo": (75, 3, 20),
    "mmlu": (45, 1, 2),  # warm-up passes, timed passes (best of)
    "generation": (45, 1, 3),  # warm-up calls, timed rounds (median)
    "pretrain_compiled": (240, 5, 30),
}
DRY_STEPS = {
    "pretrain": (60, 1, 1),
    "dpo": (60, 1, 1),
    "mmlu": (60, 1, 1),
    "generation": (60, 1, 1),
    "pretrain_compiled": (60, 1, 1),
}
WORDS = [
    "energy",
    "market",
    "cell",
    "law",
    "river",
    "theory",
    "value",
    "signal",
    "court",
    "protein",
    "vector",
    "price",
    "city",
    "enzyme",
    "voltage",
    "treaty",
    "species",
    "equation",
    "memory",
    "culture",
    "orbit",
    "tissue",
    "contract",
    "molecule",
    "rate",
    "poem",
    "planet",
    "nerve",
    "income",
    "layer",
    "bridge",
    "acid",
    "wave",
    "tax",
    "virus",
    "matrix",
    "empire",
    "lens",
    "gene",
    "credit",
    "climate",
]


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in this (main) thread after `seconds`."""

    def fire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"time box of {seconds:.1f} s exceeded")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Setup:
    dry_run: bool
    device: Any  # torch.device
    model: Any  # models.config.ModelConfig
    pretrain_batch: int
    pretrain_zero_stage: int
    dpo_batch: int
    dpo_seq_len: int
    dpo_zero_stage: int
    k_shot: int
    steps: dict[str, tuple[int, int, int]]


def gpu_setup(dry_run: bool) -> Setup:
    """The gpu profile through the project's config code; in a dry run, the same profile with tiny shapes."""
    import torch

    from tasks.core.config import resolve_params

    params = resolve_params("gpu")
    model = dataclasses.replace(
        params.model, vocab_size=-(-params.tokenizer.vocab_size // 64) * 64
    )  # as tasks/pretrain.py model_config sizes it from the trained tokenizer
    if params.pretrain.seq_len != model.max_seq_len:
        raise ValueError(
            f"pretrain.seq_len {params.pretrain.seq_len} != model.max_seq_len {model.max_seq_len}"
        )
    setup = Setup(
        dry_run=dry_run,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        model=model,
        pretrain_batch=params.pretrain.train.micro_batch_size,
        pretrain_zero_stage=params.pretrain.train.zero_stage,
        dpo_batch=params.dpo.train.micro_batch_size,
        dpo_seq_len=params.dpo.seq_len,
        dpo_zero_stage=params.dpo.train.zero_stage,
        k_shot=params.evaluate.k_shot,
        steps=GPU_STEPS,
    )
    if dry_run:
        tiny: dict[str, Any] = dict(
            n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=128, vocab_size=512
        )
        setup.model = dataclasses.replace(model, **tiny)
        setup.pretrain_batch, setup.dpo_batch, setup.dpo_seq_len = 2, 2, 128
        setup.steps = DRY_STEPS
    return setup


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ parts
def part_pretrain(s: Setup, compile: bool) -> dict[str, Any]:
    """benchmarks/pretrain.py our_loop: the real train() with random tokens; tokens/s and MFU as the loop logs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.pretrain import our_loop

    name = "pretrain_compiled" if compile else "pretrain"
    _, warmup, steps = s.steps[name]
    args = argparse.Namespace(warmup=warmup, steps=steps, batch=s.pretrain_batch)
    over = dict(zero_stage=s.pretrain_zero_stage, grad_accum=1, compile=compile)
    # eager: attention on the flash kernel or a failure; compiled: inductor's own SDPA lowering
    ctx = contextlib.nullcontext() if compile else sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    with ctx:
        res = our_loop(s.model, args, **over)
    from tasks.train.distributed import world_size

    return {
        "tokens_per_s": res["tokens_per_s"],
        "mfu": res.get("mfu"),
        "micro_batch": s.pretrain_batch,
        "seq_len": s.model.max_seq_len,
        "grad_accum": 1,
        "warmup_steps": warmup,
        "measured_steps": steps,
        "step_s": res["step_s"],
        "first_steps_s": res["first_steps_s"],
        "final_loss": res["final_loss"],
        "zero_stage": {
            "config": s.pretrain_zero_stage,
            "effective": s.pretrain_zero_stage if world_size() > 1 else 0,
            "note": "one process: the loop runs DeepSpeed stage 0 (tasks/train/distributed.py)",
        },
        "compile": compile,
        "sdpa": "default dispatch under inductor" if compile else "flash (forced by sdpa_kernel)",
    }


def long_pairs(root: Path, seq_len: int, n: int) -> None:
    """Replace the workspace's short preference pairs with pairs that fill the context: prompt and each
    response about half of it (preference_pairs truncates the prompt from the left to fit)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.data.chat_tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(root / "data/tokenizer/tokenizer.json")
    rng = random.Random(0)

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tok.encode(" ".join(words))) < tokens:
            words += rng.choices(WORDS, k=max(1, tokens // 8))
        return " ".join(words)

    half = seq_len // 2 + 8
    rows = [{"prompt": text(half), "chosen": text(half), "rejected": text(half)} for _ in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), root / "data/validated/preference.parquet")


def part_dpo(s: Setup) -> dict[str, Any]:
    """benchmarks/posttrain.py: its workspace (setup) with the gpu model, then its worker's loop_bf16 run."""
    from benchmarks import posttrain

    _, warmup, steps = s.steps["dpo"]
    n_pairs = max(4 * s.dpo_batch, 16)
    args = argparse.Namespace(
        steps=warmup + steps,  # posttrain counts max_steps including the warm-up
        warmup=warmup,
        batch=s.dpo_batch,
        zero_stage=s.dpo_zero_stage,
        seq_len=s.dpo_seq_len,
        pairs=n_pairs,
        layers=s.model.n_layer,
        d_model=s.model.d_model,
    )
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-dpo-") as tmp:
        root = Path(tmp)
        try:
            posttrain.setup(root, args, config=s.model)
            long_pairs(root, s.dpo_seq_len, n_pairs)
            res = posttrain.worker("dpo", "loop_bf16", root, args)
            from tasks.data import chat_data
            from tasks.data.chat_tokenizer import ChatTokenizer

            tok = ChatTokenizer.load(root / "data/tokenizer/tokenizer.json")
            pairs = chat_data.preference_pairs(tok, s.dpo_seq_len)
        finally:
            os.chdir(cwd)
    lengths = [len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in pairs]
    return {
        "pairs_per_s": round(res["per_s"], 2),
        "micro_batch_pairs": s.dpo_batch,
        "seq_len": s.dpo_seq_len,
        "mean_tokens_per_pair": round(sum(lengths) / len(lengths), 1),
        "warmup_steps": warmup,
        "measured_steps": res["timed_steps"],
        "zero_stage_config": s.dpo_zero_stage,
        "bf16": True,
        "sdpa": "default dispatch (a plain causal forward: flash is its first choice on CUDA)",
    }


def generated_mmlu(subjects: int, per_subject: int, k_shot: int) -> tuple[list[Any], dict[str, list[Any]]]:
    """MMLU-shaped items of random words: ~45-word questions and 1-8-word choices (real MMLU lengths)."""
    from tasks.eval.mmlu_data import MMLUItem

    rng = random.Random(0)

    def item(subject: str, i: int) -> MMLUItem:
        question = " ".join(rng.choices(WORDS, k=rng.randint(20, 70))) + "?"
        choices = tuple(" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) for _ in range(4))
        return MMLUItem(subject, question, choices, rng.randrange(4), f"generated#{i}")  # type: ignore[arg-type]

    names = [f"subject_{j}" for j in range(subjects)]
    shots = {n: [item(n, i) for i in range(k_shot)] for n in names}
    items = [item(n, i) for n in names for i in range(per_subject)]
    return items, shots


def part_mmlu(s: Setup) -> dict[str, Any]:
    """tasks.eval.mmlu.score_items as tasks/evaluate.py calls it (fp32 model, batch MMLU_BATCH)."""
    import torch

    from benchmarks.eval import train_tokenizer
    from models.llama import Transformer
    from tasks.eval import mmlu, mmlu_prompt

    _, warm, repeats = s.steps["mmlu"]
    subjects, per_subject, vocab = (2, 3, 512) if s.dry_run else (8, 32, 4096)
    batch = 16  # tasks/evaluate.py MMLU_BATCH
    items, shots = generated_mmlu(subjects, per_subject, s.k_shot)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-mmlu-") as tmp:
        tok = train_tokenizer(Path(tmp) / "tokenizer.json", vocab)
    torch.manual_seed(0)
    model = Transformer(s.model).to(s.device).eval()

    def run(part: list[Any]) -> dict[str, Any]:
        return mmlu.score_items(model, tok, part, s.k_shot, batch, s.device, shots=shots)

    for _ in range(warm):
        run(items[: 2 * batch])
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        scores = run(items)
        sync()
        best = min(best, time.perf_counter() - t0)
    ctx = [
        len(tok.encode(mmlu_prompt.harness_prompt(it, shots[it.subject][: s.k_shot])[0])) + 1 for it in items
    ]
    return {
        "items_per_s": round(len(items) / best, 2),
        "items": len(items),
        "subjects": subjects,
        "k_shot": s.k_shot,
        "batch_size": batch,
        "mean_context_tokens": round(sum(ctx) / len(ctx), 1),
        "max_context_tokens": max(ctx),
        "truncated_items": sum(1 for c in scores["truncated_tokens"] if c),
        "tokenizer_vocab": tok.vocab_size,
        "dtype": "float32",
        "warmup_passes": warm,
        "timed_passes_best_of": repeats,
    }


def part_generation(s: Setup) -> dict[str, Any]:
    """benchmarks/generation.py batched: generate_batch with the KV cache, per-row seeded sampling."""
    import torch

    from benchmarks.generation import batched
    from models.llama import Transformer

    _, warm, rounds = s.steps["generation"]
    batch, (lo, hi), new = (3, (4, 16), 4) if s.dry_run else (64, (64, 512), 256)
    torch.manual_seed(0)
    model = Transformer(s.model).to(s.device, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    prompts = [torch.randint(3, s.model.vocab_size, (n,), generator=g).tolist() for n in lengths]
    for _ in range(warm):
        batched(model, prompts, min(new, 8), seed=0)
    tps, generated = [], []
    for r in range(rounds):
        sync()
        t0 = time.perf_counter()
        rows = batched(model, prompts, new, seed=100 * r)
        sync()
        dt = time.perf_counter() - t0
        generated.append(sum(len(x) for x in rows))
        tps.append(generated[-1] / dt)
    return {
        "tokens_per_s": round(statistics.median(tps), 1),
        "tokens_per_s_rounds": [round(x, 1) for x in tps],
        "batch": batch,
        "prompt_len_range": [lo, hi],
        "mean_prompt_len": round(sum(lengths) / batch, 1),
        "new_tokens": new,
        "generated_tokens_per_round": generated,
        "sampling": "temperature 1, top-k 50, one seeded generator per row",
        "dtype": "bfloat16",
        "warmup_calls": warm,
        "timed_rounds_median_of": rounds,
    }


# ------------------------------------------------------------------------------------------------ run
def environment(s: Setup) -> dict[str, Any]:
    import deepspeed
    import torch

    from benchmarks.machine import cpu_name

    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu",
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "python": sys.version.split()[0],
    }
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
        env["device_count"] = torch.cuda.device_count()
    else:
        env["torch_threads"] = torch.get_num_threads()
    return env


def refuse_without_cuda(dry_run: bool) -> None:
    import torch

    if dry_run or torch.cuda.is_available():
        return
    print(
        "benchmarks/gpu.sh: no CUDA device (torch.cuda.is_available() is False; torch "
        f"{torch.__version__}, built for CUDA {torch.version.cuda}). The full run measures the gpu profile's "
        "model (12 layers, context 1024) and would take hours on a CPU: run it on a CUDA machine with a "
        "CUDA build of torch, or `bash benchmarks/gpu.sh --dry-run` (tiny shapes) to check the script here.",
        file=sys.stderr,
    )
    raise SystemExit(2)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[int]:
    """Library prints (DeepSpeed, tqdm, NCCL) go to stderr, so stdout holds only the JSON; yields a
    descriptor of the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield saved
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_part(
    name: str,
    fn: Callable[[], dict[str, Any]],
    box: float,
    deadline: float,
    on_hang: Callable[[str, float], None] | None = None,
    grace: float = HANG_GRACE_S,
) -> dict[str, Any]:
    """Run one part under its time box (an alarm raising PartTimeout in the main thread); an exception is
    recorded as its error string. A part stuck where the alarm cannot reach it (inside one C call) gets
    on_hang(name, limit) from a watchdog thread `grace` seconds after its box: main's prints what is done."""
    import threading

    import torch

    limit = min(box, deadline - time.monotonic())
    out: dict[str, Any] = {"time_box_s": round(limit, 1)}
    if limit <= 0:
        out["error"] = "not run: the run's deadline was reached"
        return out
    log(f"{name}: start (time box {limit:.0f} s)")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    watchdog = threading.Timer(limit + grace, on_hang, (name, limit)) if on_hang else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    t0 = time.monotonic()
    try:
        with time_box(limit):
            out.update(fn())
        out["error"] = None
    except BaseException as exc:  # PartTimeout, CUDA OOM, a compile error: record it, keep the others
        if isinstance(exc, KeyboardInterrupt):
            raise
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc(file=sys.stderr)
    finally:
        if watchdog is not None:
            watchdog.cancel()
    out["wall_s"] = round(time.monotonic() - t0, 2)
    if torch.cuda.is_available():
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"{name}: {'ok' if out['error'] is None else 'FAILED: ' + out['error'][:200]} in {out['wall_s']} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, 1+1 steps, CPU allowed")
    ap.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = ap.parse_args()
    start = time.monotonic()
    refuse_without_cuda(args.dry_run)  # before any work

    import torch

    from models.llama import Transformer
    from tasks.train.mfu import measure_matmul_tflops

    deadline = start + DEADLINE_S
    with stdout_to_stderr() as real_stdout:
        s = gpu_setup(args.dry_run)
        result: dict[str, Any] = {"benchmark": "gpu", "dry_run": args.dry_run, **environment(s)}
        n = 8192 if s.device.type == "cuda" and not args.dry_run else 512
        peak = measure_matmul_tflops(s.device, torch.bfloat16, n=n)
        os.environ["PIPELINE_PEAK_TFLOPS"] = str(peak)  # the loop's logged MFU divides by this same peak
        model = Transformer(s.model)
        result.update(
            {
                "peak_bf16_matmul_tflops": round(peak, 3),
                "peak_matmul_shape": [n, n, n],
                "profile": "gpu",
                "model": {
                    **{k: getattr(s.model, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head")},
                    "max_seq_len": s.model.max_seq_len,
                    "vocab_size": s.model.vocab_size,
                    "params_M": round(model.num_params() / 1e6, 2),
                    "flops_per_token": model.flops_per_token(s.model.max_seq_len),
                },
                "steps": {
                    k: {"time_box_s": v[0], "warmup": v[1], "measured": v[2]} for k, v in s.steps.items()
                },
            }
        )
        del model
        parts: dict[str, Any] = {}
        result["parts"] = parts

        def on_hang(name: str, limit: float) -> None:
            """From the watchdog thread: the main thread is stuck in one call; report and leave."""
            parts[name] = {
                "time_box_s": round(limit, 1),
                "error": f"hung: still running {HANG_GRACE_S:.0f} s "
                "after its time box (stuck inside one call the alarm cannot interrupt)",
            }
            finish(result, parts, start, args.out, real_stdout)
            os._exit(1)

        todo: dict[str, Callable[[], dict[str, Any]]] = {
            "pretrain": lambda: part_pretrain(s, compile=False),
            "dpo": lambda: part_dpo(s),
            "mmlu": lambda: part_mmlu(s),
            "generation": lambda: part_generation(s),
            "pretrain_compiled": lambda: part_pretrain(s, compile=True),
        }
        for name, fn in todo.items():
            if name == "pretrain_compiled" and args.dry_run and s.device.type == "cpu":
                parts[name] = {
                    "skipped": "torch.compile is not run on CPU in --dry-run: inductor's C++ build of the "
                    "model takes minutes on a shared CPU; the GPU run measures it",
                    "error": None,
                }
                continue
            parts[name] = run_part(name, fn, s.steps[name][0], deadline, on_hang)
        result = finish(result, parts, start, args.out, real_stdout)
    return 1 if result["failed_parts"] else 0


def finish(result: dict[str, Any], parts: dict[str, Any], start: float, out: Path | None, fd: int) -> dict:
    """The JSON object: figures of every part (a part not reached is named), written to `fd` (stdout)."""
    result = {**result, "parts": {**parts}}
    for name in ("pretrain", "dpo", "mmlu", "generation", "pretrain_compiled"):
        result["parts"].setdefault(name, {"error": "not run: an earlier part hung"})
    p = result["parts"]
    if "tokens_per_s" in p["pretrain_compiled"] and "tokens_per_s" in p["pretrain"]:
        result["compiled_vs_eager"] = round(
            p["pretrain_compiled"]["tokens_per_s"] / p["pretrain"]["tokens_per_s"], 3
        )
    result["failed_parts"] = [k for k, v in p.items() if v.get("error")]
    result["wall_s"] = round(time.monotonic() - start, 1)
    text = json.dumps(result) + "\n"
    if out:
        out.write_text(text)
    data = text.encode()
    while data:
        data = data[os.write(fd, data) :]
    return result


if __name__ == "__main__":
    sys.exit(main())
