"""Serving under load, its limits and bad requests; checkpoints that carry pickled code.

One module-scoped server: a tiny random Transformer (special-token rows zeroed, so greedy decoding never
stops at once and every answer has text) is logged and registered through tasks/core/tracking.py into the
session's sqlite store (tests/conftest.py), then served by `mlflow models serve --env-manager local` on a free loopback port, with the
limits under test in its environment. Latency figures come from benchmarks/serving.py; these tests check
behaviour only: every request answered with the right completion or cleanly refused, the server alive.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.servers import serve_model, stop_server
from tests.helpers.workspace import make_workspace

REPO = Path(__file__).resolve().parents[1]
MODEL = "serving-test"
LIMITS = {
    "UVICORN_LIMIT_CONCURRENCY": "24",  # open connections per server process; more get 503
    "UVICORN_TIMEOUT_KEEP_ALIVE": "60",  # the connection-limit test holds idle connections open
    "PIPELINE_SERVE_MAX_CONCURRENT": "1",  # generations at once
    "PIPELINE_SERVE_MAX_WAITING": "4",  # requests waiting for a generation slot; more get 503
    "PIPELINE_SERVE_WAIT_S": "20",
}
PARAMS = {"max_new_tokens": 8}


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What does function number {i} in json do?"}]


def tiny_checkpoint(root: Path) -> Path:
    """A workspace at root (tiny params, data/tokenizer) and a tiny random chat model in root/ckpt."""
    from models.checkpoint import save_checkpoint
    from models.config import ModelConfig
    from models.llama import Transformer
    from tasks.data.chat_tokenizer import ChatTokenizer

    make_workspace(root)
    tokenizer_json = root / "data/tokenizer/tokenizer.json"
    tok = ChatTokenizer.load(tokenizer_json)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=384, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128)
    model = Transformer(config)
    with torch.no_grad():
        model.embed.weight[: tok.end_id + 1] = 0  # the specials (ids 0..end): logit 0, never the argmax
    save_checkpoint(root / "ckpt", model, config, {"tokenizer_fingerprint": tok.fingerprint})
    return root / "ckpt"


def tiny_registered_model(root: Path, name: str = MODEL) -> str:
    """Log a tiny random chat model through tasks.tracking; the models:/ URI of its registered version."""
    from tasks.core import registry, tracking

    ckpt = tiny_checkpoint(root)
    with tracking.stage_run("serving-test"):
        info = registry.log_chat_model("chat", name, ckpt, root / "data/tokenizer/tokenizer.json")
    return f"models:/{name}/{info.registered_model_version}"


def post(port: int, body: object, content_type: str = "application/json") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", "/invocations", body=data, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The model, registered in the session's store (its tables exist once any earlier test used it)."""
    root = tmp_path_factory.mktemp("serving")
    return root, tiny_registered_model(root)


@pytest.fixture(scope="module")
def local(store):
    """The same registered version loaded in-process through MLflow, as `pipeline chat` loads it."""
    import mlflow

    return mlflow.pyfunc.load_model(store[1])


@pytest.fixture(scope="module")
def server(store):
    root, uri = store
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.update(LIMITS, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc, port = serve_model(uri, env, root / "server.log")
    try:
        yield port
    finally:
        stop_server(proc)


def clean_rejection(status: int, body: str) -> bool:
    """503 from uvicorn's connection limit (plain text) or the pyfunc's generation slots (JSON)."""
    if status != 503:
        return False
    if body == "Service Unavailable":
        return True
    return json.loads(body)["error_code"] == "TEMPORARILY_UNAVAILABLE" and "server busy" in body


# ----------------------------------------------------------------------------------------- load
@pytest.mark.e2e
def test_fifty_concurrent_chat_requests_are_answered_or_cleanly_refused(server, local):
    expected = [local.predict([{"messages": question(i)}], params=PARAMS)[0] for i in range(50)]
    assert all(isinstance(e, str) and e.strip() for e in expected)
    results: dict[int, tuple[int, str]] = {}
    errors: list[str] = []
    barrier = threading.Barrier(50)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = post(server, {"inputs": [{"messages": question(i)}], "params": PARAMS})
        except Exception as exc:  # a reset or refused connection is not a clean rejection
            errors.append(f"request {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(50)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, 120 - (time.time() - start)))
    assert not any(t.is_alive() for t in threads), "requests still pending after 120 s"
    assert not errors, errors
    answered = {
        i: json.loads(body)["predictions"][0] for i, (status, body) in results.items() if status == 200
    }
    refused = {i: r for i, r in results.items() if i not in answered}
    assert answered, "no request was answered"
    assert {i: a for i, a in answered.items() if a != expected[i]} == {}, (
        "each answer is its prompt's completion"
    )
    assert all(clean_rejection(*r) for r in refused.values()), refused
    status, body = post(server, {"inputs": [{"messages": question(0)}], "params": PARAMS})
    assert status == 200 and json.loads(body)["predictions"] == [expected[0]], "alive after the load"


@pytest.mark.e2e
def test_connection_limit_refuses_with_503_then_recovers(server, local):
    limit = int(LIMITS["UVICORN_LIMIT_CONCURRENCY"])
    idle = [http.client.HTTPConnection("127.0.0.1", server, timeout=10) for _ in range(limit - 1)]
    try:
        for conn in idle:  # keep-alive connections, held open (uvicorn closes them after 5 s idle)
            conn.request("GET", "/ping")
            conn.getresponse().read()
        status, body = post(server, {"inputs": [{"messages": question(1)}], "params": PARAMS})
        assert (status, body) == (503, "Service Unavailable")
    finally:
        for conn in idle:
            conn.close()
    deadline = time.time() + 10
    while (reply := post(server, {"inputs": [{"messages": question(1)}], "params": PARAMS}))[0] != 200:
        assert time.time() < deadline, reply
        time.sleep(0.2)
    assert json.loads(reply[1])["predictions"] == local.predict([{"messages": question(1)}], params=PARAMS)


def test_generation_slots_queue_then_refuse_with_server_busy(local):
    from tasks.serve.pyfunc import Admission, ServerBusy

    chat, request = local.unwrap_python_model(), [{"messages": question(2)}]
    answer = local.predict(request, params=PARAMS)
    replies: list[object] = []

    def waiting_request() -> threading.Thread:
        def run() -> None:
            try:
                replies.append(local.predict(request, params=PARAMS))
            except ServerBusy as exc:
                replies.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        while chat.admission.waiting < 1:
            time.sleep(0.01)
        return thread

    previous, chat.admission = chat.admission, Admission(slots=1, max_waiting=1, wait_s=0.5)
    try:
        with chat.admission.slot():  # the one slot is taken: one request may wait, the next is refused
            waiter = waiting_request()
            with pytest.raises(ServerBusy, match=r"server busy: the wait queue is full \(1 of 1 generation"):
                local.predict(request, params=PARAMS)
            waiter.join()
        busy = replies.pop()
        assert isinstance(busy, ServerBusy) and busy.get_http_status_code() == 503
        assert "no generation slot came free within 0.5 s" in str(busy)
        chat.admission = Admission(slots=1, max_waiting=1, wait_s=30)
        with chat.admission.slot():  # a waiting request is served as soon as the slot frees
            waiter = waiting_request()
        waiter.join()
        assert replies == [answer] and chat.admission.running == chat.admission.waiting == 0
    finally:
        chat.admission = previous


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("PIPELINE_SERVE_MAX_CONCURRENT", "0", "must be a finite int >= 1"),
        ("PIPELINE_SERVE_MAX_WAITING", "many", "must be a finite int >= 0"),
        ("PIPELINE_SERVE_WAIT_S", "inf", "must be a finite float >= 0"),
    ],
)
def test_malformed_serving_limits_are_named(name, value, message):
    from tasks.serve.pyfunc import Admission

    with pytest.raises(ValueError, match=f"{name}='{value}' {message}"):
        Admission.from_env({name: value})


# ------------------------------------------------------------------------------------ bad requests
M = question(3)


def body(messages: object = M, records: int = 1, **params: object) -> dict:
    return {"inputs": [{"messages": messages}] * records, "params": params}


BAD_REQUESTS = {  # case: (body, HTTP status, message)
    "max_new_tokens over the limit": (
        body(max_new_tokens=100000),
        400,
        "max_new_tokens must be in 1..256, got 100000",
    ),
    "max_new_tokens zero": (body(max_new_tokens=0), 400, "max_new_tokens must be in 1..256, got 0"),
    "max_new_tokens filling the context": (
        body(max_new_tokens=128),
        400,
        "max_new_tokens=128 leaves no room in the context of 128 tokens",
    ),
    "negative temperature": (
        body(temperature=-1.0),
        400,
        "temperature must be a finite number >= 0, got -1.0",
    ),
    "too many records": (body(records=17), 400, "17 records in one request, more than the limit 16"),
    "too many messages": (body(M * 33), 400, "record 0: 33 messages, more than the limit 32"),
    "oversized message": (body([{"role": "user", "content": "x" * 16001}]), 400, "exceed 16000 characters"),
    "no messages field": ({"inputs": [{"prompt": "hi"}]}, 400, "Model is missing inputs ['messages']"),
    "message without content": (body([{"role": "user"}]), 400, "Missing required properties: {'content'}"),
    "messages not a list": (body("hello"), 400, "Expected data to be list"),
    "not JSON": (b'{"inputs": [', 400, "Invalid input"),
    "unsupported content type": (
        b"messages=hi",
        415,
        "This predictor only supports the following content types",
    ),
    # every other field of a request: a 400 naming it (ours, or MLflow's schema check), never a traceback
    "negative top_k": (body(top_k=-3), 400, "top_k must be >= 0 (0: off), got -3"),
    "top_k not an integer": (body(top_k=2.5), 400, "Failed to validate type and shape for 'top_k'"),
    "infinite temperature": (
        b'{"inputs": [{"messages": [{"role": "user", "content": "hi"}]}], "params": {"temperature": 1e999}}',
        400,
        "temperature must be a finite number >= 0, got inf",
    ),
    "temperature not a number": (body(temperature="hot"), 400, "for 'temperature'"),
    "max_new_tokens not a number": (body(max_new_tokens="many"), 400, "for 'max_new_tokens'"),
    "top_p not a number": (body(top_p="most"), 400, "for 'top_p'"),
    "seed not a number": (body(seed="lucky"), 400, "for 'seed'"),
    "top_p zero": (body(top_p=0.0), 400, "top_p must be in (0, 1], got 0.0"),
    "top_p over one": (body(top_p=1.5), 400, "top_p must be in (0, 1], got 1.5"),
    "negative seed": (body(seed=-1), 400, f"seed must be in 0..{2**63 - 1}, got -1"),
    "seed too large": (body(seed=2**70), 400, f"seed must be in 0..{2**63 - 1}, got {2**70}"),
    "unknown role": (
        body([{"role": "wizard", "content": "hi"}]),
        400,
        "record 0, message 0: role 'wizard' is not one of system, user, assistant",
    ),
    "role not a string": (body([{"role": 5, "content": "hi"}]), 400, "schema for key `role`"),
    "content not a string": (body([{"role": "user", "content": 5}]), 400, "schema for key `content`"),
    "message not an object": (body(["hello"]), 400, "Expected data to be dictionary, got str"),
    "unknown message field": (
        body([{"role": "user", "content": "hi", "name": "x"}]),
        400,
        "Invalid properties not defined in the schema found: {'name'}",
    ),
    "params not an object": (
        {"inputs": [{"messages": M}], "params": ["x"]},
        400,
        "Parameters must be a dictionary",
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_with_a_clear_message_and_changes_nothing(server, local, case):
    body, code, message = BAD_REQUESTS[case]
    content_type = "text/plain" if case == "unsupported content type" else "application/json"
    status, reply = post(server, body, content_type)
    assert status == code and message in reply, (status, reply[-2000:])
    assert "Traceback" not in reply and "stack_trace" not in reply, (
        "a refusal is a message, not a stack trace"
    )
    status, reply = post(server, {"inputs": [{"messages": M}], "params": PARAMS})
    assert status == 200 and json.loads(reply)["predictions"] == local.predict(
        [{"messages": M}], params=PARAMS
    )


CHAT_REFUSALS = {  # `pipeline chat` and predict_stream call the model without MLflow's schema check
    "unknown role": ([{"role": "wizard", "content": "hi"}], {}, "message 0: role 'wizard' is not one of"),
    "content not a string": ([{"role": "user", "content": 5}], {}, "message 0: content must be a string"),
    "message not an object": (["hello"], {}, "message 0 must be an object with role and content"),
    "unknown message field": (
        [{"role": "user", "content": "hi", "name": "x"}],
        {},
        "message 0: unknown field(s) ['name']",
    ),
    "negative top_k": (M, {"top_k": -1}, "top_k must be >= 0"),
    "top_k not an integer": (M, {"top_k": 2.5}, "top_k must be an integer, got 2.5"),
    "temperature as bool": (M, {"temperature": True}, "temperature must be a number, got True"),
    "top_p zero": (M, {"top_p": 0}, "top_p must be in (0, 1]"),
    "NaN temperature": (M, {"temperature": float("nan")}, "temperature must be a finite number >= 0"),
}


@pytest.mark.parametrize("case", list(CHAT_REFUSALS))
def test_streamed_chat_checks_every_field_with_the_same_error(local, case):
    messages, params, message = CHAT_REFUSALS[case]
    chat = local.unwrap_python_model()
    with pytest.raises(ValueError) as refused:  # the model's RequestError: HTTP 400 when served
        next(chat.stream_chat(messages, {"max_new_tokens": 4, **params}))
    assert type(refused.value).__name__ == "RequestError" and message in str(refused.value)


@pytest.mark.e2e
def test_prompt_longer_than_the_context_is_answered_from_its_last_tokens(server, local):
    from models.generate import generate

    chat = local.unwrap_python_model()
    long = [{"role": "user", "content": "Explain these words: " + " ".join(f"word{i}" for i in range(400))}]
    ids, _ = chat.tokenizer.render_chat(long, add_generation_prompt=True)
    context, new = chat.model.config.max_seq_len, PARAMS["max_new_tokens"]
    assert len(ids) > context, "the prompt must not fit for this test to mean anything"

    def greedy(prompt: list[int]) -> str:
        tok = chat.tokenizer
        stops, pad = [tok.end_id, tok.eos_id], tok.pad_id
        out = generate(
            chat.model,
            torch.tensor([prompt]),
            max_new_tokens=new,
            temperature=0.0,
            stop_tokens=stops,
            pad_id=pad,
        )
        return tok.decode(out[0, len(prompt) :].tolist())

    last = greedy(ids[len(ids) - (context - new) :])  # its last tokens, leaving room for the answer
    first = greedy(ids[: context - new])  # what cutting the end off would answer
    assert last != first, "the two truncations must answer differently for the check to tell them apart"
    status, reply = post(server, {"inputs": [{"messages": long}], "params": PARAMS})
    assert status == 200 and json.loads(reply)["predictions"] == [last]


@pytest.mark.e2e
def test_a_burst_past_the_wait_queue_gets_a_json_server_busy_503_then_the_server_answers(server, local):
    """12 requests at once, each 16 conversations long (one holds the slot for seconds): 1 generates, 4
    wait, the rest are refused at once with the pyfunc's JSON 503; 12 stay under uvicorn's connection
    limit (24), so no refusal is uvicorn's plain-text one."""
    slots, waiting = (int(LIMITS[k]) for k in ("PIPELINE_SERVE_MAX_CONCURRENT", "PIPELINE_SERVE_MAX_WAITING"))
    n = 12
    assert slots + waiting < n < int(LIMITS["UVICORN_LIMIT_CONCURRENCY"])
    heavy = {"inputs": [{"messages": question(i)} for i in range(16)], "params": {"max_new_tokens": 48}}
    results: list[tuple[int, str]] = []
    barrier = threading.Barrier(n)

    def one() -> None:
        barrier.wait()
        results.append(post(server, heavy))

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == n, "requests still pending after 120 s"
    answered = [json.loads(b)["predictions"] for s, b in results if s == 200]
    busy = [json.loads(b) for s, b in results if s == 503]
    assert len(answered) + len(busy) == n, [r for r in results if r[0] not in (200, 503)]
    assert all(len(a) == 16 and all(isinstance(x, str) for x in a) for a in answered)
    assert answered and busy, (len(answered), len(busy))  # some generated, some were refused
    for refusal in busy:
        assert refusal["error_code"] == "TEMPORARILY_UNAVAILABLE", refusal
        assert "server busy: the wait queue is full" in refusal["message"], refusal
    status, reply = post(server, {"inputs": [{"messages": question(0)}], "params": PARAMS})
    assert status == 200, reply
    assert json.loads(reply)["predictions"] == local.predict([{"messages": question(0)}], params=PARAMS)


# ------------------------------------------------------------------------ pickled code in checkpoints
class RunsCode:
    """Unpickling this calls os.mkdir(marker): the marker directory exists iff the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_weights_holding_pickled_code_are_refused_and_never_run(tmp_path, how):
    from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from models.config import ModelConfig
    from models.hf import hf_config, import_hf
    from models.llama import Transformer

    marker = tmp_path / "code-ran"
    config = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=16)
    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer(config), config)
    weights = ckpt / "model.safetensors"
    if how == "torch.save":
        torch.save({"embed.weight": RunsCode(marker)}, weights)
    else:
        weights.write_bytes(pickle.dumps({"embed.weight": RunsCode(marker)}, protocol=2))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "pytorch_model.bin").write_bytes(weights.read_bytes())
    (hf / "config.json").write_text(json.dumps(hf_config(config, bos_id=None, eos_id=None, pad_id=None)))
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match="is a pickle \\(torch.save\\) file, not safetensors: refused"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        import_hf(hf)
    assert not marker.exists(), "the pickled code ran"
    assert tree(tmp_path) == before, "a refused load changed files"


def test_resume_state_holding_pickled_code_is_refused_and_never_run(tmp_path):
    make_workspace(tmp_path, ["pretrain.train.max_steps=4", "pretrain.train.micro_batch_size=4"])
    marker = tmp_path / "code-ran"
    tag = tmp_path / "data/state/pretrain/step00000001"
    tag.mkdir(parents=True)
    torch.save({"module": RunsCode(marker), "step": 1}, tag / "mp_rank_00_model_states.pt")
    (tag.parent / "latest").write_text(tag.name)
    outputs = {tmp_path / "data/metrics/pretrain.json": b'{"loss": 1.0}\n'}
    for path, data in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    before = tree(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # the session's MLflow store
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.pretrain"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert not marker.exists(), "the pickled code in the resume state ran"
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mp_rank_00_model_states.pt names posix.mkdir, not a tensor type: refused" in proc.stdout
    assert not (tmp_path / "data/checkpoints/base").exists()
    assert tree(tmp_path / "data") == before
