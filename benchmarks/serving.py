"""Serving latency under load: `mlflow models serve` of a registered chat model on loopback.

A random model of the cpu profile's shape by default (4 layers, d=256, ctx 256; the tokenizer of
tests/helpers/workspace.py) is logged and registered through tasks/core/tracking.py into a temp sqlite store and served
with `mlflow models serve --env-manager local -h 127.0.0.1`. Special-token embeddings are zeroed, so greedy
decoding never stops early and every request generates exactly --max-new-tokens tokens.

For each server configuration, measured in the same run:
  - baseline: the same chat requests sent one at a time (no queueing): p50/p95 latency
  - load:     --concurrency requests released at once (one thread each, a barrier): p50/p95/max latency of
              the answered ones, how many were answered (200) and refused (503, by which bound), wall time
Configurations: `default` (the pyfunc's default limits: 1 generation at a time, 8 waiting, 30 s wait; no
uvicorn connection limit) and `bounded` (the limits tests/test_serving.py serves with). Each is measured
--rounds times (figures are noisy on shared machines). Prints one JSON object.

    .venv/bin/python benchmarks/serving.py [--concurrency 50] [--max-new-tokens 32] [--rounds 2]
        [--layers 4] [--d-model 256] [--configs default,bounded]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from tests.helpers.servers import serve_model, stop_server  # noqa: E402

CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "bounded": {
        "UVICORN_LIMIT_CONCURRENCY": "24",
        "PIPELINE_SERVE_MAX_CONCURRENT": "1",
        "PIPELINE_SERVE_MAX_WAITING": "4",
        "PIPELINE_SERVE_WAIT_S": "20",
    },
}


def register(root: Path, layers: int, d_model: int) -> str:
    import torch

    from models.checkpoint import save_checkpoint
    from models.config import ModelConfig
    from models.llama import Transformer
    from tasks.core import registry, tracking
    from tasks.data.chat_tokenizer import ChatTokenizer
    from tests.helpers.workspace import make_workspace

    make_workspace(root)
    tokenizer_json = root / "data/tokenizer/tokenizer.json"
    tok = ChatTokenizer.load(tokenizer_json)
    config = ModelConfig(
        vocab_size=tok.vocab_size, n_layer=layers, n_head=4, n_kv_head=2, d_model=d_model, max_seq_len=256
    )
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        model.embed.weight[: tok.end_id + 1] = 0  # specials never win the argmax: full-length answers
    save_checkpoint(root / "ckpt", model, config, {"tokenizer_fingerprint": tok.fingerprint})
    with tracking.stage_run("bench-serving"):
        info = registry.log_chat_model("chat", "bench-serving", root / "ckpt", tokenizer_json)
    return f"models:/bench-serving/{info.registered_model_version}"


def post(port: int, body: dict[str, Any]) -> tuple[int, str, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/invocations", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), time.perf_counter() - start
    finally:
        conn.close()


def request(i: int, max_new: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"What does function number {i} in json do?"}]
    return {"inputs": [{"messages": messages}], "params": {"max_new_tokens": max_new}}


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_s": None, "p95_s": None, "max_s": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {
        "p50_s": round(statistics.median(ordered), 4),
        "p95_s": round(p95, 4),
        "max_s": round(ordered[-1], 4),
    }


def load(port: int, concurrency: int, max_new: int) -> dict[str, Any]:
    results: dict[int, tuple[int, str, float]] = {}
    errors: list[str] = []
    barrier = threading.Barrier(concurrency)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = post(port, request(i, max_new))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    answered = [s for status, _, s in results.values() if status == 200]
    refused = {"connection_limit_503": 0, "server_busy_503": 0, "other": 0}
    for status, body, _ in results.values():
        if status == 200:
            continue
        if status == 503 and body == "Service Unavailable":
            refused["connection_limit_503"] += 1
        elif status == 503 and "server busy" in body:
            refused["server_busy_503"] += 1
        else:
            refused["other"] += 1
    return {
        **quantiles(answered),
        "answered": len(answered),
        "rejected": refused,
        "client_errors": errors[:5],
        "wall_s": round(wall, 3),
        "answered_per_s": round(len(answered) / wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-requests", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--configs", default="default,bounded")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    uri = register(root, args.layers, args.d_model)
    base_env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    base_env["PYTHONPATH"] = str(REPO)
    runs = []
    for name in args.configs.split(","):
        env = {**base_env, **CONFIGS[name]}
        proc, port = serve_model(uri, env, root / f"server-{name}.log")
        try:
            post(port, request(0, args.max_new_tokens))  # warm-up: first-call allocations
            for round_ in range(args.rounds):
                sequential = [
                    post(port, request(i, args.max_new_tokens)) for i in range(args.baseline_requests)
                ]
                assert all(status == 200 for status, _, _ in sequential), sequential[:2]
                runs.append(
                    {
                        "config": name,
                        "round": round_ + 1,
                        "limits": CONFIGS[name],
                        "baseline_one_at_a_time": quantiles([s for _, _, s in sequential]),
                        "load": load(port, args.concurrency, args.max_new_tokens),
                    }
                )
            alive = post(port, request(1, args.max_new_tokens))[0] == 200
            runs[-1]["alive_after"] = alive
        finally:
            stop_server(proc)
    print(
        json.dumps(
            {
                "benchmark": "serving",
                "cpu": cpu_name(),
                "cores": os.cpu_count(),
                "model": {"layers": args.layers, "d_model": args.d_model, "max_seq_len": 256},
                "concurrency": args.concurrency,
                "max_new_tokens": args.max_new_tokens,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
