"""A tiny synthetic workspace (tokenizer, token shards, validated chat data) for stage-level tests.

Made in the test's temp dir in about a second, so training stages can be tested without running the
data stages first.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.core.config import dump_params, resolve_params

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_workspace(root: Path, overrides: list[str] | None = None, pairs: int = 64) -> None:
    dump_params(resolve_params("tiny", overrides or []), root / "params.yaml")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text() for p in sorted((stdlib / "json").glob("*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    (root / "data/tokenizer").mkdir(parents=True)
    tok.save(str(root / "data/tokenizer/tokenizer.json"))
    fingerprint = hashlib.sha256((root / "data/tokenizer/tokenizer.json").read_bytes()).hexdigest()
    ids: list[int] = []
    for text in texts:
        ids += [1, *tok.encode(text).ids, 2]
    arr = np.array(ids, dtype=np.uint16)
    cut = int(len(arr) * 0.9)
    (root / "data/tokens").mkdir(parents=True)
    arr[:cut].tofile(root / "data/tokens/train.bin")
    arr[cut:].tofile(root / "data/tokens/val.bin")
    (root / "data/tokens/index.json").write_text(
        json.dumps({"dtype": "uint16", "tokenizer_fingerprint": fingerprint})
    )
    rng = random.Random(0)
    words = ["encode", "decode", "parse", "dump", "load", "scan", "quote", "split"]
    sft, pref = [], []
    for i in range(pairs):
        question = f"What does {words[i % len(words)]} number {i} do?"
        answer = f"It will {words[i % len(words)]} the value {i} correctly."
        sft.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        )
        pref.append({"prompt": question, "chosen": answer, "rejected": f"zq xv {rng.randint(0, 9999)} kk"})
    (root / "data/validated").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(sft), root / "data/validated/sft.parquet")
    pq.write_table(pa.Table.from_pylist(pref), root / "data/validated/preference.parquet")
