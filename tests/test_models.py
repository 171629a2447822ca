"""Fast CPU tests of models/: HF parity, KV cache, packing, overfitting, checkpoints, heads, config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_dict_hash
from models.config import ModelConfig
from models.generate import generate, stream
from models.heads import PolicyWithValue, ScalarHeadModel, last_token_values
from models.hf import export_hf, import_hf
from models.llama import Transformer


def tiny_config(**overrides: Any) -> ModelConfig:
    base: dict[str, Any] = dict(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides: Any) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides)).eval()
    # Non-trivial norm gains, so a wrong norm-weight mapping cannot hide behind all-ones.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def random_tokens(B: int, T: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- Hugging Face parity


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tied, GQA 4 query heads / 2 kv heads
        {"tie_embeddings": False},
        {"n_kv_head": 1, "rope_theta": 500.0},  # multi-query; a non-default theta must reach HF
        {"n_kv_head": 4, "ffn_hidden": 96},  # plain multi-head, explicit MLP width
    ],
)
def test_hf_export_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    import transformers

    model = tiny_model(**overrides)
    export_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = random_tokens(2, 40)
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    back = import_hf(tmp_path / "hf")
    assert back.config == model.config
    assert state_dict_hash(back) == state_dict_hash(model)


def test_hf_export_tokenizer_loads_with_autotokenizer(tmp_path: Path) -> None:
    import tokenizers
    import transformers

    words = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "def", "return"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    export_hf(
        tiny_model(),
        tmp_path / "hf",
        tmp_path / "tokenizer.json",
        bos_id=1,
        eos_id=2,
        pad_id=0,
        chat_template=template,
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert hf_tok.eos_token_id == 2
    assert hf_tok("hello world")["input_ids"] == [4, 5]
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert chat == "hello "
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)


def test_import_hf_rejects_unsupported_families(tmp_path: Path) -> None:
    export_hf(tiny_model(), tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='gpt2'.*not supported; supported: llama"):
        import_hf(tmp_path / "hf")


# ---------------------------------------------------------------------- KV cache and generation


def test_incremental_cache_logits_equal_full_forward() -> None:
    model = tiny_model()
    tokens = random_tokens(2, 30)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2)
        # Prefill 10, then a chunk of 5 (masked path), then one token at a time.
        parts = [model(tokens[:, :10], cache=cache), model(tokens[:, 10:15], cache=cache)]
        parts += [model(tokens[:, t : t + 1], cache=cache) for t in range(15, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_greedy_generate_with_and_without_cache_agree() -> None:
    model = tiny_model()
    prompt = random_tokens(3, 5)
    a = generate(model, prompt, max_new_tokens=20, temperature=0.0, use_cache=True)
    b = generate(model, prompt, max_new_tokens=20, temperature=0.0, use_cache=False)
    assert a.shape == (3, 25)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)
    streamed = list(stream(model, prompt[0].tolist(), max_new_tokens=20, temperature=0.0))
    assert streamed == a[0, 5:].tolist()


def test_sampled_generate_is_seeded() -> None:
    model = tiny_model()
    prompt = random_tokens(2, 4)
    kw: dict[str, Any] = dict(max_new_tokens=12, temperature=1.0, top_k=5, top_p=0.9)
    a = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, prompt, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, prompt, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    d = generate(model, prompt, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)


def test_every_sampled_token_lies_in_its_steps_top_k() -> None:
    """generate, stream and generate_batch: each new token is among the k most likely after its prefix
    (logits recomputed here without a cache). The tiny random model's next-token distribution is nearly
    flat over 128 ids, so sampling that ignored top_k would leave the top 3 at almost every step."""
    from models.generate import generate_batch

    model, k = tiny_model(), 3
    prompt = random_tokens(2, 4)
    kw: dict[str, Any] = dict(max_new_tokens=20, temperature=1.0, top_k=k)
    rows = generate(model, prompt, generator=torch.Generator().manual_seed(3), **kw)[:, 4:].tolist()
    rows.append(list(stream(model, prompt[0].tolist(), generator=torch.Generator().manual_seed(4), **kw)))
    rows += generate_batch(model, [[5, 6, 7], [9]], generator=torch.Generator().manual_seed(5), **kw).rows()
    prompts = [*prompt.tolist(), prompt[0].tolist(), [5, 6, 7], [9]]
    not_greedy = 0
    for p, new in zip(prompts, rows, strict=True):
        assert len(new) == 20
        for t, token in enumerate(new):
            with torch.no_grad():
                logits = model(torch.tensor([p + new[:t]]))[0, -1]
            assert token in logits.topk(k).indices.tolist(), (p, t)
            not_greedy += token != int(logits.argmax())
    assert not_greedy > 10  # it sampled (temperature 1), not greedy decoding


# Hand-made next-token distribution over 5 ids: p = [0.5, 0.3, 0.15, 0.05, 0].
P = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])


def draws(n: int = 20000, **kw: Any) -> torch.Tensor:  # [5] frequency of each id over n draws
    from models.generate import sample_next

    logits = P.log().expand(n, -1)  # [n, 5]; log 0 = -inf: id 4 can never be drawn
    ids = sample_next(logits, generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(ids, minlength=5).float() / n


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"temperature": 1.0}, [0.5, 0.3, 0.15, 0.05, 0]),
        ({"temperature": 1.0, "top_k": 2}, [0.625, 0.375, 0, 0, 0]),  # renormalised over the top 2
        # Nucleus 0.7: ids 0 (cum 0.5 < 0.7) and 1 (reaches 0.8) stay; id 2 starts at 0.8 >= 0.7.
        ({"temperature": 1.0, "top_p": 0.7}, [0.625, 0.375, 0, 0, 0]),
        ({"temperature": 1.0, "top_p": 0.4}, [1, 0, 0, 0, 0]),  # the top token always stays
        ({"temperature": 1.0, "top_p": 0.9}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0, 0]),
        # Temperature T: p ** (1 / T), renormalised (T = 0.5 squares, T = 2 takes square roots).
        ({"temperature": 0.5}, [0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365, 0]),
        ({"temperature": 2.0}, [x / sum(P.sqrt().tolist()) for x in P.sqrt().tolist()]),
        # Temperature first, then top-k: T = 0.5 over the top 2 ids.
        ({"temperature": 0.5, "top_k": 2}, [0.25 / 0.34, 0.09 / 0.34, 0, 0, 0]),
        ({"temperature": 0.0, "top_k": 3}, None),  # greedy: always id 0
    ],
)
def test_sampling_draws_follow_temperature_top_k_and_top_p(kw: dict[str, Any], expected: Any) -> None:
    freq = draws(**kw)
    if expected is None:
        assert freq.tolist() == [1.0, 0, 0, 0, 0]
        return
    expected = torch.tensor(expected, dtype=torch.float32)
    assert torch.equal(freq == 0, expected == 0), freq  # exactly the filtered ids are never drawn
    # 20000 draws: one standard deviation is at most 0.0036; 0.015 is over 4.
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.01}, r"top_p must be in \(0, 1\], got 1.01"),
    ],
)
def test_sampling_options_out_of_range_are_refused(kw: dict[str, Any], message: str) -> None:
    from models.generate import sample_next

    with pytest.raises(ValueError, match=message):
        sample_next(P.log().expand(2, -1), **kw)
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), random_tokens(1, 4), max_new_tokens=2, **kw)


def test_generate_stop_tokens_pad_and_early_exit() -> None:
    model = tiny_model()
    prompt = random_tokens(2, 4)
    greedy = generate(model, prompt, max_new_tokens=10, temperature=0.0)
    stop = int(greedy[0, 6])  # row 0 emits this as its 3rd new token
    out = generate(model, prompt, max_new_tokens=10, temperature=0.0, stop_tokens=[stop], pad_id=127)
    first = int((greedy[0, 4:] == stop).nonzero()[0])
    assert out[0, 4 + first] == stop
    assert (out[0, 5 + first :] == 127).all()
    # stream ends at the stop token and does not yield it
    assert list(
        stream(model, prompt[0].tolist(), max_new_tokens=10, temperature=0.0, stop_tokens=[stop])
    ) == (greedy[0, 4 : 4 + first].tolist())
    # Every row stops at once -> the loop ends after one token.
    one = generate(model, prompt, max_new_tokens=10, temperature=0.0, stop_tokens=range(128))
    assert one.shape == (2, 5)


def test_generate_respects_context_length() -> None:
    model = tiny_model()
    out = generate(model, random_tokens(1, 60), max_new_tokens=50, temperature=0.0)
    assert out.shape == (1, 64)  # capped at max_seq_len
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, random_tokens(1, 65), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        stream(model, list(range(65)), max_new_tokens=1)


def test_sequence_longer_than_context_raises() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="sequence of 65 tokens exceeds the model context max_seq_len=64"):
        model(random_tokens(1, 65))


# ---------------------------------------------------------------------- packed documents


def test_doc_ids_isolate_packed_documents() -> None:
    model = tiny_model()
    doc1, doc2 = random_tokens(1, 13, seed=3), random_tokens(1, 17, seed=4)
    packed = torch.cat([doc1, doc2], dim=1)
    doc_ids = torch.tensor([[0] * 13 + [1] * 17])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        alone1, alone2 = model(doc1), model(doc2)
        leaky = model(packed)
    torch.testing.assert_close(out[:, 13:], alone2, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :13], alone1, atol=1e-5, rtol=0)
    assert (leaky[:, 13:] - alone2).abs().max() > 1e-3  # without doc_ids doc 2 does see doc 1


def test_packed_rows_train_through_the_fused_cpu_attention_kernel() -> None:
    """The doc_ids mask keeps SDPA's fused flash kernel on CPU, forward and backward (why models/llama.py
    keeps the dense mask: benchmarks/packing.py); a change that made SDPA fall back to its unfused math path
    would show as aten::_scaled_dot_product_attention_math."""
    from torch.profiler import profile

    model = tiny_model()
    tokens = random_tokens(2, 30, seed=5)
    doc_ids = torch.tensor([[0] * 13 + [1] * 17, [0] * 30])
    with profile() as prof:
        model(tokens, doc_ids=doc_ids).float().sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


# ---------------------------------------------------------------------- training sanity


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layer=2, d_model=64, max_seq_len=32))
    batch = random_tokens(4, 33, seed=5)
    x, y = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.configure_optimizer_groups(0.0), lr=3e-3)
    loss = torch.tensor(float("inf"))
    for _ in range(300):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


def test_param_accounting_and_optimizer_groups() -> None:
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 128 * 64
    assert tied.flops_per_token(seq_len=64) == 6 * tied.num_params() + 12 * 2 * 4 * 16 * 64
    # the scalar heads (reward, PPO value): the value head (64 weights + a bias) counts, and a reward model's
    # lm_head, which it never runs, does not: its MFU counts the work it does
    from models.heads import PolicyWithValue, ScalarHeadModel

    attention = 12 * 2 * 4 * 16 * 64
    for lm in (tied, untied):
        trunk = lm.num_params() - (0 if lm.config.tie_embeddings else 128 * 64)  # no embedding lookups
        assert ScalarHeadModel(lm).flops_per_token(64) == 6 * (trunk - 128 * 64 + 65) + attention
        assert PolicyWithValue(lm).flops_per_token(64) == 6 * (trunk + 65) + attention
    decay, no_decay = tied.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == tied.num_params()


# ---------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_overwrite(tmp_path: Path) -> None:
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt", model, model.config, meta={"step": 3})
    loaded, cfg = load_checkpoint(tmp_path / "ckpt", kind="causal_lm")
    assert cfg["kind"] == "causal_lm" and cfg["step"] == 3
    assert isinstance(loaded, Transformer)
    assert state_dict_hash(loaded) == state_dict_hash(model)
    assert loaded.lm_head.weight is loaded.embed.weight  # re-tied

    other = tiny_model(seed=1)
    save_checkpoint(tmp_path / "ckpt", other, other.config)  # over an existing checkpoint
    reloaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert state_dict_hash(reloaded) == state_dict_hash(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old dirs left behind

    raw = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: u64 length + JSON header + raw bytes
    assert "embed.weight" in header and "lm_head.weight" not in header
    assert b"\x80\x04" not in raw[:2] and not raw.startswith(b"PK")  # no pickle / torch zip archive

    # Same weights, same bytes, every time (dvc.lock hashes): each save builds a fresh header map
    for i in range(8):
        save_checkpoint(tmp_path / f"again{i}", other, other.config)
        assert (tmp_path / f"again{i}" / "model.safetensors").read_bytes() == raw, i


@pytest.mark.parametrize("cls, kind", [(ScalarHeadModel, "scalar_head"), (PolicyWithValue, "policy_value")])
def test_checkpoint_heads_round_trip(tmp_path: Path, cls: type, kind: str) -> None:
    model = cls(tiny_model(tie_embeddings=False))
    save_checkpoint(tmp_path / "ckpt", model, model.config)
    loaded, cfg = load_checkpoint(tmp_path / "ckpt", kind=kind)
    assert isinstance(loaded, cls) and cfg["kind"] == kind
    assert state_dict_hash(loaded) == state_dict_hash(model)
    with pytest.raises(CheckpointError, match="expected 'causal_lm'"):
        load_checkpoint(tmp_path / "ckpt", kind="causal_lm")


def test_checkpoint_truncated_file(tmp_path: Path) -> None:
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt", model, model.config)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ckpt")


def test_checkpoint_shape_mismatch_and_missing_files(tmp_path: Path) -> None:
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt", model, model.config)
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"] = tiny_config(d_model=32).to_dict()  # a config from another model
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*shape mismatch"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------------- heads


def test_scalar_heads_shapes_and_last_token_values() -> None:
    trunk = tiny_model()
    tokens = random_tokens(3, 10)
    values = ScalarHeadModel(trunk)(tokens)
    assert values.shape == (3, 10)
    logits, v = PolicyWithValue(trunk)(tokens)
    assert logits.shape == (3, 10, 128) and v.shape == (3, 10)

    table = torch.arange(30.0).view(3, 10)
    assert last_token_values(table, torch.tensor([1, 10, 4])).tolist() == [0.0, 19.0, 23.0]
    with pytest.raises(ValueError, match="lengths"):
        last_token_values(table, torch.tensor([0, 3, 4]))


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"d_model": 66}, "d_model"),
        ({"n_kv_head": 3}, "n_kv_head"),
        ({"n_layer": 0}, "n_layer"),
        ({"d_model": 36, "n_head": 4, "n_kv_head": 1}, "head_dim"),  # head_dim 9 is odd
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_dict_round_trip() -> None:
    cfg = tiny_config(ffn_hidden=0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig(d_model=256).ffn_dim == 704  # int(8/3*256)=682 -> next multiple of 64
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
