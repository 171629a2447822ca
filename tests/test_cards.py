"""Model cards: what register writes as a version's description and `pipeline export` as README.md.

The card from recorded facts (synthetic records, checked section by section); export of a version with a
card writes exactly that text after the Hugging Face front matter; a version registered before cards
existed still gets one, made from its tags. The whole path (register -> description -> export) on a real
run is in tests/test_browser.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.serve.card import front_matter, model_card

CONFIG = {
    "model": {
        "vocab_size": 512,
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 2,
        "d_model": 64,
        "max_seq_len": 128,
        "rope_theta": 10000.0,
        "tie_embeddings": True,
    },
    "kind": "causal_lm",
    "stage": "dpo",
    "parent": "sft",
    "metrics": {"loss": 0.68, "rewards/accuracies": 0.75, "val/loss": 0.69},
}
TAGS = {
    "stage": "dpo",
    "parent": "sft",
    "profile": "tiny",
    "seed": "1337",
    "git.commit": "a" * 40,
    "git.dirty": "false",
    "weights_sha256": "b" * 64,
    "manifest.sha256": "c" * 64,
    "tokenizer_fingerprint": "d" * 64,
    "dvc.deps.data/checkpoints/sft": "e" * 32 + ".dir",
    "dvc.deps.data/validated/preference.parquet": "f" * 32,
    "dvc.outs.data/checkpoints/dpo": "0" * 32 + ".dir",
    "params.dpo": json.dumps({"dpo": {"beta": 0.1, "train": {"lr": 0.0005, "max_steps": 20}}}),
    "champion.decision": "promoted: no champion yet",
}
SOURCES = {
    "pretrain": {"kind": "embedded", "path": "", "hf_id": ""},
    "sft": {"kind": "hf", "hf_id": "HuggingFaceTB/smol-smoltalk", "path": ""},
    "min_chars": 10,
}


def test_the_card_says_what_how_how_well_what_for_and_what_not():
    card = model_card(
        "pipeline-dpo", "3", CONFIG, TAGS, {"mmlu/acc": 0.2667, "ppl/val": 271.06}, SOURCES, 123456
    )
    sections = [line for line in card.splitlines() if line.startswith("#")]
    assert sections == [
        "# pipeline-dpo v3",
        "## Architecture",
        "## Data",
        "## Training",
        "## Evaluation",
        "## Intended use",
        "## Limitations",
        "## Lineage",
    ]
    assert "trained by the `dpo` stage of llm-pipeline from `sft` (profile `tiny`, seed 1337)" in card
    assert "| parameters | 0.12M |" in card and "| layers x width | 2 x 64 |" in card
    assert "| context | 128 tokens |" in card and "| attention heads (key/value) | 4 (2) |" in card
    assert "- sft: hf: HuggingFaceTB/smol-smoltalk" in card and "- pretrain: embedded: the embedded" in card
    assert f"| `data/validated/preference.parquet` | `{'f' * 32}` |" in card
    assert "dvc.outs" not in card and "`data/checkpoints/dpo`" not in card  # inputs only
    assert '"lr": 0.0005' in card and '"beta": 0.1' in card  # the stage's params, as recorded
    assert "| rewards/accuracies | 0.75 |" in card and "val/loss" not in card.split("## Evaluation")[0]
    assert "| mmlu/acc | 0.2667 |" in card and "Champion gate: promoted: no champion yet" in card
    assert "MMLU accuracy 0.267 against 0.25 for chance" in card
    assert "narrow domain" in card  # the embedded corpus is one of the sources
    assert f"| git commit | `{'a' * 40}` |" in card and "pipeline replay pipeline-dpo/3" in card


def test_a_reward_model_card_says_it_scores_and_was_not_evaluated():
    config = {**CONFIG, "kind": "scalar_head", "stage": "reward"}
    tags = {**TAGS, "stage": "reward"}
    card = model_card("pipeline-reward", "1", config, tags, {}, {}, 1000)
    assert "A reward model (Llama-style decoder with a scalar head" in card
    assert "Not evaluated" in card and "MMLU accuracy" not in card
    assert front_matter("reward", "scalar_head").startswith("---\nlibrary_name: transformers\n")
    assert yaml.safe_load(front_matter("dpo", "causal_lm").split("---")[1]) == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["llm-pipeline", "dpo"],
    }


def test_export_writes_the_version_card_as_readme(tmp_path, capsys):
    from flows.registered import export
    from models.checkpoint import load_checkpoint
    from tasks.core import registry
    from tests.test_serving import tiny_registered_model

    ref = tiny_registered_model(tmp_path, name="card-chat").removeprefix("models:/")
    name, number = ref.split("/")
    # registered without a card (as before cards existed): one is made from the version's tags
    out = export(ref, tmp_path / "plain")
    readme = (out / "README.md").read_text()
    meta, body = readme.split("---\n", 2)[1:]
    assert yaml.safe_load(meta)["pipeline_tag"] == "text-generation"
    assert body.lstrip().startswith(f"# {name} v{number}\n")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert f"| parameters | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M |" in body
    assert "README.md" in json.loads((out / ".pipeline-export.json").read_text())["files"]
    # with a card as its description (what register writes): README.md is that text, after the metadata
    card = "# card-chat v1\n\nA card written at registration.\n"
    registry.describe_version(name, number, card)
    out = export(ref, tmp_path / "carded")
    assert Path(out / "README.md").read_text() == front_matter("", "causal_lm") + card
