"""The HTTP API through a real uvicorn server on 127.0.0.1 (a free port), with the tiny trained run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lmforge.attention import word_attention
from lmforge.config import ServeConfig
from lmforge.generate import SamplingParams, generate, stream_text
from lmforge.model import GPTConfig
from lmforge.pipeline import answer_question, load
from lmforge.serve import ServerThread, build_app

CONTEXT = "Paris is the capital and most populous city of France."
SPAN_SETTINGS = {
    "eval.span_calibration": "1.0",
    "eval.span_skip_question_words": "true",
    "eval.span_max_starts": "4",
    "eval.dtype": "bfloat16",
}
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(tiny_run):
    # span answers chosen as the run's eval.span_* settings say (here: calibrated, question words skipped)
    with ServerThread(build_app(tiny_run, overrides=SPAN_SETTINGS)) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def sse_lines(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def stream_completion(client: httpx.Client, path: str, body: dict) -> tuple[str, list[dict]]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        data = sse_lines(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    key = "delta" if path.endswith("chat/completions") else None
    text = "".join(
        (c["choices"][0]["delta"].get("content", "") if key else c["choices"][0]["text"])
        for c in chunks
        if c["choices"]
    )
    return text, chunks


# --------------------------------------------------------------------------- text streaming helper


def test_stream_text_stops_before_stop_strings_split_across_tokens():
    pieces = ["Hel", "lo, wo", "rld", "!!", " more"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    out = list(stream_text(decode, range(len(pieces)), stop=["world!"]))
    assert "".join(p for p, _, _ in out) == "Hello, "
    assert out[-1][2] is True and out[-1][1] == 4  # stopped on the 4th token
    # text that only looked like the start of a stop string is released once it cannot be one
    out = list(stream_text(decode, range(len(pieces)), stop=["wonder"]))
    assert "".join(p for p, _, _ in out) == "Hello, world!! more" and not out[-1][2]


class _EndsAtOnce(torch.nn.Module):
    """A stand-in model whose most likely next token is always end-of-text (id 0), then id 3."""

    def __init__(self):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=6, block_size=32)
        self.tok_emb = torch.nn.Embedding(6, 2)

    def new_cache(self, batch: int):
        return None

    def forward(self, ids, cache=None, last_only=False):
        logits = torch.zeros(ids.shape[0], 1, 6)
        logits[..., 0], logits[..., 3] = 5.0, 1.0
        return logits


def test_min_new_tokens_holds_back_end_of_text():
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_ids={0})
    assert generate(_EndsAtOnce(), [1, 2], params) == []
    params.min_new_tokens = 3
    assert generate(_EndsAtOnce(), [1, 2], params) == [3, 3, 3]


# --------------------------------------------------------------------------- basics


def test_health_models_and_info(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    ids = {m["id"] for m in models["data"]}
    assert {"best", "last", "pretrained"} <= ids
    one = client.get("/v1/models/pretrained").json()
    assert one["id"] == "pretrained" and one["object"] == "model" and one["stage"] == "pretrain"
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and "available: " in missing.json()["error"]["message"]
    info = client.get("/api/info").json()
    assert info["active"] == "best" and info["model"]["n_layer"] == 2
    page = client.get("/")
    assert page.status_code == 200 and "Attention explorer" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_chat_answer_matches_the_pipeline(client, tiny_run):
    model, tok = load(tiny_run, "best")
    expected = answer_question(model, tok, QUESTION, CONTEXT, max_new_tokens=16)
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "best",
            "temperature": 0,
            "max_tokens": 16,
            "context": CONTEXT,
            "messages": [{"role": "user", "content": QUESTION}],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected
    # the context may also come as a system message
    r2 = client.post(
        "/v1/chat/completions",
        json={
            "temperature": 0,
            "max_tokens": 16,
            "messages": [{"role": "system", "content": CONTEXT}, {"role": "user", "content": QUESTION}],
        },
    )
    assert r2.json()["choices"][0]["message"]["content"] == expected
    forced = client.post(
        "/v1/chat/completions",
        json={"temperature": 0, "max_tokens": 16, "min_tokens": 6, "messages": [{"role": "user", "content": QUESTION}]},
    )
    assert forced.json()["usage"]["completion_tokens"] >= 6
    streamed, chunks = stream_completion(
        client,
        "/v1/chat/completions",
        {"temperature": 0, "max_tokens": 16, "context": CONTEXT, "messages": [{"role": "user", "content": QUESTION}]},
    )
    assert streamed == expected  # the deltas join to the whole message (no leading space)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_span_answers_are_those_of_eval_and_need_a_context(client, tiny_run):
    """decoding "span": the context's likeliest span, made as `lmforge eval`/`generate --question` make it
    (the run's eval settings), whole in one piece; streamed or not; refused in one line without a context."""
    from lmforge.config import load_recipe
    from lmforge.evaluate import SpanOptions

    recipe = load_recipe(tiny_run / "config.toml", SPAN_SETTINGS)
    model, tok = load(tiny_run, "best")
    expected = answer_question(
        model,
        tok,
        QUESTION,
        CONTEXT,
        max_new_tokens=recipe.eval.max_new_tokens,
        context_tokens=recipe.answer_context_tokens,
        decoding="span",
        span=SpanOptions(1.0, True, 4),
        dtype="bfloat16",
    )
    assert expected and expected in CONTEXT
    info = client.get("/api/info").json()["answering"]
    assert info == {
        "decoding": recipe.eval.decoding,
        "max_new_tokens": recipe.eval.max_new_tokens,
        "context_tokens": recipe.answer_context_tokens,
        "span": {"calibration": 1.0, "skip_question_words": True, "max_starts": 4},
        "dtype": "bfloat16",
        "with_context": True,
    }
    body = {"decoding": "span", "context": CONTEXT, "messages": [{"role": "user", "content": QUESTION}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == expected
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert 0 < answer["usage"]["completion_tokens"] <= recipe.eval.max_new_tokens  # the span's passage tokens
    assert answer["usage"]["prompt_tokens"] > len(tok.encode(QUESTION))
    streamed, chunks = stream_completion(
        client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert streamed == expected and chunks[-1]["usage"] == answer["usage"]
    r = client.post(
        "/v1/chat/completions", json={"decoding": "span", "messages": [{"role": "user", "content": QUESTION}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "decoding"
    assert "context" in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={**body, "decoding": "beam"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "decoding"
    # a question too long for the block is refused before anything runs, streamed or not
    for stream in (False, True):
        r = client.post(
            "/v1/chat/completions",
            json={**body, "stream": stream, "messages": [{"role": "user", "content": "why " * 2000}]},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_completion_streaming_matches_non_streaming(client):
    # min_tokens: the tiny model may otherwise end at once, which would make these checks vacuous
    body = {
        "model": "pretrained",
        "prompt": "Once upon a time",
        "max_tokens": 24,
        "min_tokens": 12,
        "temperature": 0.9,
        "seed": 7,
    }
    whole = client.post("/v1/completions", json=body).json()
    text = whole["choices"][0]["text"]
    assert whole["usage"]["completion_tokens"] > 0 and text
    streamed, chunks = stream_completion(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert streamed == text
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) > 1  # really streamed in pieces
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    other = client.post("/v1/completions", json={**body, "seed": 8}).json()["choices"][0]["text"]
    assert other != text  # the seed matters


def test_stop_strings_cut_the_text(client):
    body = {"model": "pretrained", "prompt": "The", "max_tokens": 40, "min_tokens": 30, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(text) > 6
    stop = text[3:6]
    cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed, _ = stream_completion(client, "/v1/completions", {**body, "stop": stop})
    assert streamed == text[: text.index(stop)]


# --------------------------------------------------------------------------- concurrency


def test_concurrent_requests_do_not_corrupt_each_other(tiny_run):
    bodies = [
        {"model": "pretrained", "prompt": p, "max_tokens": 30, "min_tokens": 20, "temperature": 0.8, "seed": s}
        for s, p in enumerate(
            [
                "Once upon a time",
                "The president said",
                "In 1850, the city",
                "She opened the",
                "The river",
                "A small dog",
                "Science is",
                "They walked",
            ]
        )
    ]
    # 3 generating at once, so with 8 requests some wait in the queue
    with (
        ServerThread(build_app(tiny_run, serve_cfg=ServeConfig(max_concurrent=3, max_queue=8))) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        sequential = [client.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]

        def run(i: int) -> str:
            if i % 2:
                return stream_completion(client, "/v1/completions", bodies[i])[0]
            return client.post("/v1/completions", json=bodies[i]).json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(bodies)) as pool:
            concurrent = list(pool.map(run, range(len(bodies))))
    assert len(set(sequential)) == len(bodies)  # eight different texts, so a mix-up would show
    assert concurrent == sequential


def test_overload_gets_429(tiny_run):
    app = build_app(tiny_run, "pretrained", ServeConfig(max_concurrent=1, max_queue=1))
    body = {"prompt": "Once upon a time", "max_tokens": 120, "min_tokens": 120}  # long enough to overlap
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: c.post("/v1/completions", json=body), range(12)))
        codes = [r.status_code for r in responses]
        assert 429 in codes and codes.count(200) >= 2, codes
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.json()["error"]["type"] == "rate_limit_error" and busy.headers["retry-after"]
        assert c.get("/health").json()["running"] == 0  # every slot was given back


# --------------------------------------------------------------------------- malformed requests


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ('{"prompt": "x", ', "body", "invalid JSON"),
        ('{"prompt": "x", "temperature": -1}', "temperature", "greater than or equal to 0"),
        ('{"prompt": "x", "temprature": 1}', "temprature", "unknown field"),
        ('{"prompt": "x", "top_p": "high"}', "top_p", "valid number"),
        ('{"prompt": "x", "max_tokens": 0}', "max_tokens", "greater than or equal to 1"),
        ('{"prompt": "x", "max_tokens": 100000}', "max_tokens", "at most"),
        ('{"prompt": "x", "n": 2}', "n", "only n=1"),
        ('{"prompt": "x", "max_tokens": 2, "min_tokens": 5}', "min_tokens", "must not exceed"),
        ('{"prompt": ""}', "prompt", "empty"),
        ('{"prompt": "x", "seed": 18446744073709551616}', "seed", "less than"),
        ('{"prompt": "\\ud800 lone"}', "prompt", "lone surrogate"),
        ('{"prompt": "x", "stop": ["ok", "\\udfff"]}', "stop", "lone surrogate"),
        ('{"prompt": "x", "suffix": " the end."}', "suffix", "not supported"),
        ('{"prompt": "x", "echo": true}', "echo", "not supported"),
        ('{"prompt": "x", "logprobs": 2}', "logprobs", "not supported"),
        (
            '{"prompt": "x", "max_tokens": 8, "model": "pretrained", "suffix": null, "n": null, "stream": null, '
            '"presence_penalty": null, "frequency_penalty": null, "echo": null, "temperature": 1e-40}',
            None,
            None,
        ),
        ('{"temperature": 1}', "prompt", "Field required"),
        ("[1, 2]", None, "valid dictionary"),
        ("", "body", "JSON body is required"),
    ],
)
def test_malformed_completion_requests_name_the_field(client, body, param, fragment):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    if fragment is None:  # OpenAI's nullable fields as null, and a temperature so small it is greedy: fine
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"]


def test_malformed_chat_and_other_errors(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "only context"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = client.post(
        "/v1/completions", content=b'{"prompt": "' + b"a" * 70_000 + b'"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    # a prompt that does not fit the block with max_tokens is refused, as chat refuses it, not cut silently
    r = client.post("/v1/completions", json={"prompt": "The city. " * 40, "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "does not fit the model's 128-token block" in r.json()["error"]["message"]
    # JSON may escape a lone surrogate, which no tokenizer takes: a 400 naming the field, not a 500
    for path, body, param in [
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800?"}]}', "messages.0.content"),
        ("/api/attention", '{"text": "a \\udc00 b"}', "text"),
    ]:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert client.get("/v1/completions").status_code == 405
    assert client.get("/no/such/page").json()["error"]["message"] == "Not Found"


# --------------------------------------------------------------------------- attention, memory, checkpoints


def test_attention_endpoint_matches_the_library(client, tiny_run):
    text = "Sarah lost her keys, so John lent her his spare set."
    r = client.post("/api/attention", json={"text": text})
    assert r.status_code == 200, r.text
    data = r.json()
    model, tok = load(tiny_run, "best")
    ref = word_attention(model, tok, text)
    assert data["words"] == [w.text for w in ref.words]
    torch.testing.assert_close(torch.tensor(data["per_head"]), ref.per_head, atol=1e-4, rtol=0)
    assert data["top"]["mean"] == ref.top
    n = len(data["words"])
    assert torch.tensor(data["mean"]).shape == (2, n, n)
    torch.testing.assert_close(torch.tensor(data["layers_mean"]).sum(-1), torch.ones(n), atol=1e-3, rtol=0)

    probe = "The ball rolled. It stopped."  # "The" is one token: discounting the first token removes its column
    disc = client.post("/api/attention", json={"text": probe, "discount_first": True, "normalize": True}).json()
    assert disc["tokens"][0] == "The"
    assert all(row[0] == 0 for row in disc["layers_mean"][1:])
    assert all(max(row) == pytest.approx(1.0) for row in disc["layers_mean"][1:])
    plain = client.post("/api/attention", json={"text": probe}).json()
    assert all(row[0] > 0 for row in plain["layers_mean"])


def test_attention_input_focus_and_limits(client):
    r = client.post("/api/attention", json={"question": QUESTION, "context": CONTEXT, "completion": " Paris"})
    data = r.json()
    assert data["words"][0] == "<|context|>" and data["words"][-1] == "<|answer|>"
    focus = data["focus"]
    n_new = len(focus["tokens"])
    assert torch.tensor(focus["per_layer"]).shape == (2, n_new, len(data["words"]))
    # the first answer token is read from the prompt alone: all its attention lands on the prompt's words; a
    # later one's also on the answer tokens before it, which are not among the words
    first = torch.tensor(focus["per_layer"])[:, 0].sum(-1)
    torch.testing.assert_close(first, torch.ones(2), atol=1e-3, rtol=0)
    assert sum(focus["mean"]) <= 1 + 1e-3 and (n_new > 1 or sum(focus["mean"]) == pytest.approx(1.0, abs=1e-3))
    r = client.post("/api/attention", json={"text": "word " * 400})
    assert (
        r.status_code == 400 and r.json()["error"]["param"] == "text" and "at most 128" in r.json()["error"]["message"]
    )


def test_input_focus_reads_the_prompt_the_answer_was_made_from(client, tiny_run):
    """A context longer than the block: the focus is over the window the chat answer read (span or sampled),
    and the answer's tokens are the ones the model gives (with their leading space)."""
    from lmforge.attention import tokenize_words
    from lmforge.data.qa import build_prompt, encode_for_inference

    tok = load(tiny_run, "best")[1]
    long_context = "The river flows slowly through the green valley. " * 20 + CONTEXT
    answering = client.get("/api/info").json()["answering"]
    made_from = {
        "span": encode_for_inference(
            tok, QUESTION, long_context, 128, answering["max_new_tokens"], answering["context_tokens"]
        ).ids,
        "sample": build_prompt(tok, QUESTION, long_context, 128 - 16)[0],
    }
    for decoding, prompt in made_from.items():
        r = client.post(
            "/api/attention",
            json={
                "question": QUESTION,
                "context": long_context,
                "completion": "Paris",
                "decoding": decoding,
                "max_tokens": 16,
            },
        )
        assert r.status_code == 200, r.text
        expected = [w.text for w in tokenize_words(tok, tok.decode(prompt, skip_special=False))[1]]
        assert r.json()["words"] == expected and "Paris" in expected
        assert "".join(r.json()["focus"]["tokens"]) == " Paris"
    r = client.post("/api/attention", json={"text": "a", "question": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"


def test_live_tensors_leave_out_compile_fake_tensors():
    """torch.compile leaves FakeTensors (shapes, no storage) on the heap: not memory, and reading their data
    pointer warns; the memory report counts real tensors only."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmforge.serve.memory import live_tensors

    before = live_tensors()
    with FakeTensorMode():
        fakes = [torch.empty(1024, 1024) for _ in range(3)]  # noqa: F841 - alive during the count
    real = torch.empty(256, 256)  # noqa: F841
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = live_tensors()
    assert after["count"] == before["count"] + 1
    assert 0 < after["bytes"] - before["bytes"] < 3 * 1024 * 1024 * 4


def test_memory_report_and_free(client):
    mem = client.get("/api/memory").json()
    assert mem["process"]["rss_bytes"] > 0 and mem["system"]["total_bytes"] > 0
    assert mem["models"]["best"]["parameters"] == client.get("/api/info").json()["model"]["parameters"]
    assert mem["torch"]["tensors"]["bytes"] >= mem["models"]["best"]["bytes"]
    # a request for another checkpoint loads it; freeing memory unloads what is not active
    assert client.post("/v1/completions", json={"model": "last", "prompt": "The", "max_tokens": 2}).status_code == 200
    assert "last" in client.get("/api/memory").json()["models"]
    freed = client.post("/api/memory/free").json()
    assert "last" in freed["unloaded_checkpoints"] and freed["rss_after_bytes"] > 0
    assert "last" not in client.get("/api/memory").json()["models"]


def test_checkpoint_switch(client):
    try:
        r = client.post("/api/checkpoint", json={"checkpoint": "pretrained"})
        assert r.json()["active"] == "pretrained"
        assert client.get("/health").json()["model"] == "pretrained"
        r = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 3})
        assert r.json()["model"] == "pretrained"
        assert client.post("/api/checkpoint", json={"checkpoint": "nope"}).status_code == 404
        r = client.post("/api/checkpoint", json={"checkpoint": ""})
        assert r.status_code == 400 and r.json()["error"]["param"] == "checkpoint"
        assert client.get("/health").json()["model"] == "pretrained"
    finally:
        client.post("/api/checkpoint", json={"checkpoint": "best"})
    assert client.get("/health").json()["model"] == "best"


# --------------------------------------------------------------------------- the official OpenAI client


def test_openai_client(server, tiny_run):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert {"best", "pretrained"} <= {m.id for m in client.models.list()}
    chat = client.chat.completions.create(
        model="best",
        temperature=0,
        max_tokens=16,
        messages=[{"role": "system", "content": CONTEXT}, {"role": "user", "content": QUESTION}],
    )
    model, tok = load(tiny_run, "best")
    assert chat.choices[0].message.content == answer_question(model, tok, QUESTION, CONTEXT, max_new_tokens=16)
    stream = client.chat.completions.create(
        model="best",
        temperature=0,
        max_tokens=16,
        stream=True,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"context": CONTEXT, "top_k": 5},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces).strip() == chat.choices[0].message.content
    comp = client.completions.create(
        model="pretrained",
        prompt="Once upon a time",
        max_tokens=12,
        seed=3,
        extra_body={"repetition_penalty": 1.2, "min_tokens": 4},
    )
    assert comp.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="pretrained", prompt="x", temperature=5)
    assert "temperature" in str(info.value)


# --------------------------------------------------------------------------- the command


def test_serve_command_binds_localhost(tiny_run):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmforge.cli",
            "serve",
            str(tiny_run),
            "--port",
            str(port),
            "--checkpoint",
            "pretrained",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.2)
        assert health["model"] == "pretrained"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/" in err
    bad = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "serve", str(tiny_run / "nope")], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "nope" in bad.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- continuous batching


def test_batcher_matches_generate_stream(tiny_run):
    """Requests decoded together (joining and leaving at different steps, fewer rows than requests, a
    cache compaction at the block) give the same tokens as each decoded alone."""
    import copy

    from lmforge.serve.batcher import Batcher

    model, tok = load(tiny_run, "pretrained")
    texts = [
        "Once upon a time",
        "The president of the United States said that the economy",
        "A",
        "In 1850, the city of London was the largest city in the world and its river",
        "She opened the door",
        "The river Thames flows through",
        "Science",
        "They walked to the park and saw a big dog",
    ]
    settings = [
        (30, 0.0, None, 10, 0, 1.0),
        (100, 0.8, 1, 100, 50, 1.0),
        (20, 1.0, 2, 5, 0, 1.3),
        (90, 0.0, None, 90, 0, 1.0),
        (5, 0.8, 4, 0, 40, 1.0),
        (60, 0.7, 5, 60, 0, 1.1),
        (127, 0.9, 6, 127, 0, 1.0),
        (40, 0.0, None, 40, 0, 1.2),
    ]
    params = [
        SamplingParams(
            max_new_tokens=n,
            temperature=t,
            seed=s,
            min_new_tokens=m,
            top_k=k,
            repetition_penalty=r,
            stop_ids={tok.eot_id},
        )
        for n, t, s, m, k, r in settings
    ]
    prompts = [tok.encode(t) for t in texts]
    alone = [generate(model, p, copy.deepcopy(q)) for p, q in zip(prompts, params, strict=True)]
    batcher = Batcher(model, max_rows=3)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(
                pool.map(lambda i: list(batcher.tokens(prompts[i], copy.deepcopy(params[i]))), range(len(prompts)))
            )
        assert together == alone
        # lengths forced by min_new_tokens: rows leave at different steps; 127 tokens overrun the shared timeline
        assert [len(together[i]) for i in (1, 3, 5, 6, 7)] == [100, 90, 60, 127, 40]
        # a request abandoned half-way frees its row and the others carry on
        stream = batcher.tokens(prompts[0], copy.deepcopy(params[1]))
        next(stream)
        stream.close()
        assert list(batcher.tokens(prompts[2], copy.deepcopy(params[2]))) == alone[2]
        # closing (a checkpoint unloaded) lets the requests in hand finish, then refuses new ones
        stream = batcher.tokens(prompts[1], copy.deepcopy(params[1]))
        first = next(stream)
        batcher.close()
        assert [first, *stream] == alone[1]
        batcher.thread.join(timeout=10)
        with pytest.raises(RuntimeError, match="unloaded"):
            list(batcher.tokens(prompts[2], copy.deepcopy(params[2])))
    finally:
        batcher.close()


def test_a_request_that_fails_in_the_batcher_ends_alone(tiny_run, monkeypatch):
    """A request whose own sampling fails (an impossible seed at its first token; a failure at a later
    token) gets its error; the requests decoded beside it finish with the tokens they get alone."""
    from lmforge.serve import batcher as batching

    model, tok = load(tiny_run, "pretrained")
    real_sample = batching.sample_next
    calls = {"failing": 0}

    def sample_failing_later(logits, params, history, generator):
        if params.temperature == 0.5:  # the request that fails at its third token
            calls["failing"] += 1
            if calls["failing"] == 3:
                raise RuntimeError("sampling failed")
        return real_sample(logits, params, history, generator)

    monkeypatch.setattr(batching, "sample_next", sample_failing_later)
    good = [
        SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0.8, seed=s, stop_ids={tok.eot_id})
        for s in (1, 2)
    ]
    bad_seed = SamplingParams(max_new_tokens=40, temperature=0.8, seed=2**70)
    fails_later = SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0.5, seed=3)
    prompt = tok.encode("Once upon a time")
    alone = [generate(model, prompt, p) for p in good]
    batcher = batching.Batcher(model, max_rows=4)

    def run(params):
        try:
            return list(batcher.tokens(prompt, params))
        except Exception as exc:  # noqa: BLE001
            return exc

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, [good[0], bad_seed, fails_later, good[1]]))
    finally:
        batcher.close()
    assert results[0] == alone[0] and results[3] == alone[1]
    assert isinstance(results[1], ValueError) and "Overflow" in str(results[1])
    assert isinstance(results[2], RuntimeError) and str(results[2]) == "sampling failed"


def test_a_closed_book_run_is_asked_without_the_context(tiny_run):
    """As `lmforge eval` asks a closed-book model: the passage is left out of the prompt, span answers refused."""
    with (
        ServerThread(build_app(tiny_run, overrides={"qa.mode": "closed_book"})) as url,
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        ask = {"temperature": 0, "max_tokens": 8, "min_tokens": 4, "messages": [{"role": "user", "content": QUESTION}]}
        alone = c.post("/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
        given = c.post("/v1/chat/completions", json={**ask, "context": CONTEXT}).json()
        assert given["choices"][0]["message"]["content"] == alone and given["usage"]["prompt_tokens"] < 20
        r = c.post("/v1/chat/completions", json={**ask, "context": CONTEXT, "decoding": "span"})
        assert r.status_code == 400 and "closed-book" in r.json()["error"]["message"]
        focus = c.post("/api/attention", json={"question": QUESTION, "context": CONTEXT, "completion": alone}).json()
        assert "<|context|>" not in focus["words"]


def test_a_failing_generation_is_reported_not_hung(tiny_run):
    app = build_app(tiny_run)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
        yield  # a generator, as the real one

    app.state.host.stream = broken
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": "The", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with c.stream("POST", "/v1/completions", json={"prompt": "The", "max_tokens": 4, "stream": True}) as s:
            events = [json.loads(d) for d in sse_lines(s) if d != "[DONE]"]
        assert events[-1]["error"]["message"] == "boom"
        assert c.get("/health").json()["running"] == 0
