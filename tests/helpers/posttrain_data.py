"""Post-training data from the embedded default source, for stage tests that must learn a real signal.

`tests/helpers/workspace.py` writes synthetic pairs whose rejected answer is gibberish ("zq xv 123 kk") and a
tokenizer trained on one package's code: enough to check code paths, far too easy to show learning.
`make_embedded_workspace` swaps in what `make run` trains on: a tokenizer trained as the tokenizer stage
trains it on the embedded pretraining text, and the conversations and preference pairs that
`tasks.embedded` derives from the standard library's docstrings (rejected = another object's paragraph,
the right one truncated mid-sentence, or shuffled), written as the validate stage leaves them (these rows
are valid by construction; ingest and validate are tested in their own files). About a second.
"""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import paths
from tasks.core.config import load_params
from tasks.data import embedded
from tasks.tokenizer import save_tokenizer, special_tokens, train_tokenizer
from tests.helpers.workspace import make_workspace


def write_embedded_chat_data(root: Path, sft_rows: int, pairs: int, seed: int = 1337) -> Counter[str]:
    """Overwrite data/validated/{sft,preference}.parquet with the first embedded rows; returns how many
    pairs of each rejected kind were written."""
    sft = list(itertools.islice(embedded.sft_conversations(seed), sft_rows))
    pref = list(itertools.islice(embedded.preference_pairs(seed), pairs))
    out = root / "data/validated"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(sft), out / "sft.parquet")
    pq.write_table(pa.Table.from_pylist(pref), out / "preference.parquet")
    return Counter(row["source"].split("|")[1].split(":")[0] for row in pref)


def make_embedded_workspace(root: Path, overrides: list[str], sft_rows: int, pairs: int) -> Counter[str]:
    """A tiny workspace (params from the tiny profile + overrides) holding embedded-default chat data and
    a tokenizer trained on the first `ingest.max_documents` embedded pretraining documents, as the data
    stages of the tiny profile would make it. No token shards: post-training does not read them."""
    make_workspace(root, overrides, pairs=2)
    params = load_params(root / "params.yaml")
    shutil.rmtree(root / "data/tokens")  # made with the synthetic tokenizer: they would not match
    shutil.rmtree(root / paths.TOKENIZER_DIR)
    docs = [d["text"] for d in itertools.islice(embedded.pretrain_documents(), params.ingest.max_documents)]
    tok = train_tokenizer(iter([docs]), params.tokenizer, length=len(docs))
    save_tokenizer(tok, root / paths.TOKENIZER_DIR, special_tokens(params.tokenizer))
    return write_embedded_chat_data(root, sft_rows, pairs)
