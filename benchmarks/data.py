"""Data-stage throughput at 100 MB: our ingest, tokenizer and encode next to the raw libraries, same text;
and every data stage's seconds and peak RSS with a profile's data settings.

The corpus is the embedded default pretrain text (the stdlib source and pydoc topics), repeated until it
reaches --mb megabytes; copy k > 0 has a few letters swapped (a fixed permutation per copy) and a header
line, so every document is distinct (dedup keeps them all) and the text keeps code-like statistics.
It is written as JSON lines in several files of about --file-mb MB, the way a real corpus arrives.

Each figure is measured in the same run as its reference:
- ingest: our stage (tasks.ingest: UTF-8 check, `datasets` streaming read as arrow batches, length /
  printable filters, normalised-text sha256 dedup, parquet write in a background thread) vs the raw
  read+write of the same file through the same `datasets.load_dataset("json", streaming=True)` call, row
  by row, and pyarrow's ParquetWriter (no filters). Both wall and process CPU seconds are reported: on a
  shared machine the wall ratio moves with the load (load_average is printed), the CPU ratio much less.
- tokenizer: our stage's training (text streamed from the ingested parquet, save + fingerprint) vs raw
  `Tokenizer.train_from_iterator` with the same BpeTrainer on the same text already in memory. The two
  tokenizer.json files are compared: the script fails if they differ.
- encode: our stage (tasks.encode.run in a fresh process: parquet batches -> shards + index) vs raw
  `Tokenizer.encode_batch` (and `encode_batch_fast`) over the same text in memory, also in a fresh
  process. Peak RSS (ru_maxrss of that process) is reported for our encode at the full size and at a
  quarter of it: bounded memory means the two stay close.
- stages: ingest -> validate -> tokenizer -> encode, each `tasks.<stage>.run` in a fresh process in one
  workspace, with --profile's params (default gpu: its caps, vocab and batch sizes) and the corpus as
  the pretrain source (sft/preference: the profile's sources). Per stage: seconds of run() and peak RSS
  (VmHWM, imports included; rss_before_mb is after the imports) and CPU seconds (all its threads: on a
  shared machine they move less with the load than wall seconds). Run at two --mb sizes to see which
  stages' memory grows with the data. --stages-only skips the comparisons with the raw libraries;
  --stages picks stages (each needs the ones before it); --set key=value overrides a param (e.g.
  ingest.near_dup.enabled=true; ingest.read_workers=1 with a small --file-mb for many shards).

    .venv/bin/python benchmarks/data.py [--mb 100] [--file-mb 50] [--vocab 4096] [--repeats 1]
        [--profile gpu] [--stages-only] [--stages ingest,validate,tokenizer,encode] [--set key=value]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from tasks import encode, ingest, tokenizer  # noqa: E402
from tasks.core.config import (  # noqa: E402
    IngestConfig,
    SourceConfig,
    TokenizerConfig,
    dump_params,
    resolve_params,
)
from tasks.data import embedded, sources  # noqa: E402

MB = 1e6


def perturb_table(copy: int) -> dict[int, int]:
    """A fixed letter permutation for copy k: swap k pairs of lowercase letters (none for copy 0)."""
    letters = string.ascii_lowercase
    table: dict[int, int] = {}
    for i in range(copy % 13):
        a, b = letters[(copy * 7 + i * 2) % 26], letters[(copy * 7 + i * 2 + 1) % 26]
        table[ord(a)], table[ord(b)] = ord(b), ord(a)
    return table


def corpus_documents(target_bytes: int) -> Iterator[str]:
    """The corpus documents in order, until target_bytes of UTF-8 text."""
    base = [d["text"] for d in embedded.pretrain_documents()]
    nbytes, copy = 0, 0
    while True:
        table = perturb_table(copy)
        for i, text in enumerate(base):
            doc = f"# copy {copy} document {i}\n{text.translate(table)}" if copy else text
            yield doc
            nbytes += len(doc.encode("utf-8"))
            if nbytes >= target_bytes:
                return
        copy += 1


def build_corpus(out_dir: Path, target_bytes: int, file_bytes: int) -> tuple[int, int, list[Path]]:
    """Write the corpus as JSON lines, a new file after every file_bytes of text; returns (documents,
    UTF-8 text bytes, the files in order)."""
    out_dir.mkdir(parents=True)
    documents = corpus_documents(target_bytes)
    doc = next(documents, None)
    docs, nbytes, files = 0, 0, list[Path]()
    while doc is not None:
        files.append(out_dir / f"corpus-{len(files):05d}.jsonl")
        with open(files[-1], "w", encoding="utf-8") as fh:
            in_file = 0
            while doc is not None and in_file < file_bytes:
                fh.write(json.dumps({"text": doc}) + "\n")
                size = len(doc.encode("utf-8"))
                docs, nbytes, in_file = docs + 1, nbytes + size, in_file + size
                doc = next(documents, None)
    return docs, nbytes, files


CPU: dict[str, float] = {}  # process CPU seconds (all threads) of the best run per measurement


def timed(fn: Any, name: str = "") -> tuple[float, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    seconds = time.perf_counter() - start
    if name:
        CPU[name] = min(CPU.get(name, float("inf")), time.process_time() - cpu)
    return seconds, out


# ------------------------------------------------------------------------------------------- ingest
def ours_ingest(corpus: Path, out: Path) -> ingest.Counts:
    cfg = IngestConfig(max_documents=0, max_bytes=0)
    source = ingest.open_source("pretrain", SourceConfig(kind="files", path=str(corpus)), cfg.seed)
    return ingest.ingest_dataset("pretrain", source, cfg, out)


def raw_ingest(files: list[Path], out: Path) -> int:
    rows = iter(sources.load_hf_dataset("json", None, "train", True, [str(f) for f in files]))
    schema = pa.schema([("text", pa.string())])
    n, buffer = 0, []
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for row in rows:
            buffer.append({"text": row["text"]})
            n += 1
            if len(buffer) == ingest.ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer = []
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
    return n


# ---------------------------------------------------------------------------------------- tokenizer
def raw_train(texts: list[str], cfg: TokenizerConfig) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=tokenizer.specials(cfg),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = (texts[i : i + tokenizer.BATCH_ROWS] for i in range(0, len(texts), tokenizer.BATCH_ROWS))
    tok.train_from_iterator(batches, trainer=trainer, length=len(texts))
    return tok


def ours_train(parquet: Path, cfg: TokenizerConfig, out_dir: Path) -> dict[str, Any]:
    rows = pq.ParquetFile(parquet).metadata.num_rows
    tok = tokenizer.train_tokenizer(tokenizer.iter_text(parquet), cfg, length=rows)
    return tokenizer.save_tokenizer(tok, out_dir, tokenizer.special_tokens(cfg))


# ------------------------------------------------------------------------------------------- encode
# The child reports its own peak RSS (VmHWM): ru_maxrss from wait4 would include the parent's RSS at fork.
MEMORY = """
def memory_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
"""

OURS_ENCODE = (
    MEMORY
    + """
import json, sys, time
from tasks import encode
from tasks.core.config import Params
from tasks.data.chat_tokenizer import ChatTokenizer
start_rss = memory_mb("VmRSS")
start = time.perf_counter()
index = encode.run(Params(), None)
out = {"seconds": time.perf_counter() - start, "tokens": index["train_tokens"] + index["val_tokens"]}
print(json.dumps({**out, "rss_before_mb": start_rss, "peak_rss_mb": memory_mb("VmHWM")}))
"""
)

RAW_ENCODE = (
    MEMORY
    + """
import json, sys, time
import pyarrow.parquet as pq
from tokenizers import Tokenizer
texts = pq.read_table("data/validated/pretrain.parquet").column("text").to_pylist()
tok = Tokenizer.from_file("data/tokenizer/tokenizer.json")
out = {}
for name in ("encode_batch", "encode_batch_fast"):
    call = getattr(tok, name)
    start = time.perf_counter()
    n = 0
    for i in range(0, len(texts), BATCH):
        for e in call(texts[i : i + BATCH], add_special_tokens=False):
            n += len(e.ids)
    out[name] = {"seconds": time.perf_counter() - start, "tokens": n + 2 * len(texts)}
print(json.dumps({**out, "peak_rss_mb": memory_mb("VmHWM")}))
"""
)


def in_child(code: str, cwd: Path) -> dict[str, Any]:
    """Run `code` in a fresh interpreter in cwd; its JSON output (last line of stdout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "true"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- stages
STAGES = ("ingest", "validate", "tokenizer", "encode")
STAGE = (
    MEMORY
    + """
import json, time
from tasks import STAGE
from tasks.core.config import load_params
params = load_params()
start_rss = memory_mb("VmRSS")
start, cpu = time.perf_counter(), time.process_time()
STAGE.run(params, None)
out = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
print(json.dumps({**out, "rss_before_mb": start_rss, "peak_rss_mb": memory_mb("VmHWM")}))
"""
)


def run_stages(
    ws: Path, corpus: Path, profile: str, repeats: int, stages: list[str], sets: list[str]
) -> dict[str, Any]:
    """These data stages in pipeline order, each in a fresh process in `ws`, with the profile's params
    (then `sets`, key=value) and the corpus as the pretrain source; the run with the least seconds is kept
    (its RSS with it)."""
    ws.mkdir()
    overrides = ["ingest.pretrain.kind=files", f"ingest.pretrain.path={corpus}", *sets]
    dump_params(resolve_params(profile, overrides), ws / "params.yaml")
    out: dict[str, Any] = {}
    for stage in [s for s in STAGES if s in stages]:
        runs = [in_child(STAGE.replace("STAGE", stage), ws) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        out[stage] = {k: round(v, 2 if k.endswith("seconds") else 1) for k, v in best.items()}
        out[stage]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    raw = ws / "data" / "raw" / "pretrain.parquet"
    out["raw_pretrain_parquet_mb"] = round(raw.stat().st_size / MB, 1)
    out["raw_pretrain_rows"] = pq.ParquetFile(raw).metadata.num_rows
    dropped = json.loads((ws / "data" / "raw" / "summary.json").read_text())["pretrain"]["dropped"]
    out["raw_pretrain_dropped"] = {k: v for k, v in dropped.items() if v}
    return out


def workspace(root: Path, parquet: Path, tok_dir: Path, rows: int | None = None) -> Path:
    """A directory with data/validated/pretrain.parquet (all rows or the first `rows`) and the tokenizer."""
    (root / "data" / "validated").mkdir(parents=True)
    target = root / "data" / "validated" / "pretrain.parquet"
    if rows is None:
        shutil.copy(parquet, target)
    else:
        pq.write_table(pq.read_table(parquet).slice(0, rows), target, row_group_size=ingest.ROW_GROUP)
    shutil.copytree(tok_dir, root / "data" / "tokenizer")
    return root


def ratio(ours: float, raw: float) -> float:
    return round(ours / raw, 3)


def compare(
    root: Path, corpus: Path, files: list[Path], docs: int, mb_in: float, args: Any
) -> dict[str, Any]:
    """Our ingest, tokenizer and encode next to the raw libraries on the same text."""
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    # ingest: raw first, then ours, alternating when repeated; one warm-up read pays `datasets` setup
    warm = root / "warm.jsonl"
    warm.write_text(json.dumps({"text": "warm up " * 8}) + "\n")
    raw_ingest([warm], root / "warm.parquet")
    parquet = root / "ours.parquet"
    for _ in range(args.repeats):
        t, n_raw = timed(lambda: raw_ingest(files, root / "raw.parquet"), "raw_ingest")
        keep("raw_ingest", t)
        t, counts = timed(lambda: ours_ingest(corpus, parquet), "ours_ingest")
        keep("ours_ingest", t)
    assert counts.rows_in == n_raw == docs, (counts.rows_in, n_raw, docs)

    # tokenizer: same text, same trainer settings; the results must be the same tokenizer
    cfg = TokenizerConfig(vocab_size=args.vocab)
    texts = pq.read_table(parquet).column("text").to_pylist()
    kept_mb = sum(len(t.encode("utf-8")) for t in texts) / MB
    tok_dir = root / "tokenizer"
    for _ in range(args.repeats):
        t, raw_tok = timed(lambda: raw_train(texts, cfg))
        keep("raw_train", t)
        shutil.rmtree(tok_dir, ignore_errors=True)
        t, fingerprint = timed(lambda: ours_train(parquet, cfg, tok_dir))
        keep("ours_train", t)
    same = json.loads(raw_tok.to_str()) == json.loads((tok_dir / "tokenizer.json").read_text())
    if not same:
        raise SystemExit("our tokenizer differs from the raw library's on the same text")
    texts, raw_tok = [], None  # free the in-memory copy before encode

    # encode: fresh processes, so peak RSS is the encode's own
    full = workspace(root / "ws_full", parquet, tok_dir)
    quarter_rows = pq.ParquetFile(parquet).metadata.num_rows // 4
    quarter = workspace(root / "ws_quarter", parquet, tok_dir, quarter_rows)
    raw_code = RAW_ENCODE.replace("BATCH", str(encode.BATCH_ROWS))
    for _ in range(args.repeats):
        raw = in_child(raw_code, full)
        keep("raw_encode_batch", raw["encode_batch"]["seconds"])
        keep("raw_encode_batch_fast", raw["encode_batch_fast"]["seconds"])
        ours = in_child(OURS_ENCODE, full)
        keep("ours_encode", ours["seconds"])
    assert ours["tokens"] == raw["encode_batch"]["tokens"], (
        ours["tokens"],
        raw["encode_batch"]["tokens"],
    )
    small = in_child(OURS_ENCODE, quarter)
    rss = {
        "ours_encode": ours["peak_rss_mb"],
        "ours_encode_before_run": ours["rss_before_mb"],
        "ours_encode_quarter_corpus": small["peak_rss_mb"],
        "raw_encode_all_text_in_memory": raw["peak_rss_mb"],
    }
    mbps = {k: round((mb_in if k.endswith("ingest") else kept_mb) / v, 2) for k, v in best.items()}
    return {
        "kept_mb": round(kept_mb, 2),
        "rows_kept": counts.rows_kept,
        "dropped": {k: v for k, v in counts.dropped.items() if v},
        "vocab_size": args.vocab,
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "mb_per_s": mbps,
        "ratio_ours_over_raw": {
            "ingest": ratio(mbps["ours_ingest"], mbps["raw_ingest"]),
            "tokenizer_train": ratio(mbps["ours_train"], mbps["raw_train"]),
            "encode_vs_encode_batch": ratio(mbps["ours_encode"], mbps["raw_encode_batch"]),
            "encode_vs_encode_batch_fast": ratio(mbps["ours_encode"], mbps["raw_encode_batch_fast"]),
        },
        "goal_ratio": 0.95,
        # wall time is shared with whatever else runs; CPU seconds (this process, all threads) are not
        "ingest_cpu_seconds": {k: round(v, 2) for k, v in CPU.items()},
        "ingest_cpu_ratio_raw_over_ours": ratio(CPU["raw_ingest"], CPU["ours_ingest"]),
        "tokenizer_identical_to_raw": same,
        "tokenizer_fingerprint": fingerprint["sha256"],
        "encode_tokens": ours["tokens"],
        "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "peak_rss_note": "VmHWM of a fresh process; quarter_corpus encodes the first 1/4 of the rows",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MB of UTF-8 text")
    ap.add_argument("--file-mb", type=float, default=50.0, help="MB of text per corpus file")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the best is kept")
    ap.add_argument("--profile", default="gpu", help="params profile of the stages section")
    ap.add_argument("--stages-only", action="store_true", help="skip the comparisons with raw libraries")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params override for the stages section, e.g. ingest.near_dup.enabled=true or "
        "ingest.read_workers=4 (repeatable)",
    )
    ap.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages of the stages section, run in pipeline order; each needs the ones "
        "before it (e.g. ingest,validate)",
    )
    args = ap.parse_args()
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    load_before = [round(x, 2) for x in os.getloadavg()]

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        t_build, (docs, text_bytes, files) = timed(
            lambda: build_corpus(corpus, int(args.mb * MB), int(args.file_mb * MB))
        )
        mb_in = text_bytes / MB
        out: dict[str, Any] = {
            "benchmark": "data stages vs raw libraries; every data stage's seconds and peak RSS",
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "corpus": {
                "documents": docs,
                "text_mb": round(mb_in, 2),
                "files": len(files),
                "build_seconds": round(t_build, 2),
            },
            "repeats": args.repeats,
            "load_average_before": load_before,
        }
        if not args.stages_only:
            out["vs_raw"] = compare(root, corpus, files, docs, mb_in, args)
        out["stages"] = {
            "profile": args.profile,
            "set": args.set,
            **run_stages(root / "ws_stages", corpus, args.profile, args.repeats, stages, args.set),
        }
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
        out["self_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
