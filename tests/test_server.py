"""``labkit serve`` as a real process on a free port: concurrent streams equal the offline engine, OpenAI-style 4xx
errors for bad input (and the server keeps serving), a client that disconnects mid-stream frees its blocks."""
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torch  # noqa: E402

from labkit import env, serving  # noqa: E402
from labkit.server import chat_prompt_ids  # noqa: E402

MODEL = "smollm2-135m"
SERVER_ARGS = ["--max-batch", "16", "--num-blocks", "40", "--block-size", "16", "--max-model-len", "1024",
               "--chunk-size", "32", "--threads", "1"]
NEW = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", "--port", str(port), *SERVER_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                p for p in (str(env.repo_root()), os.environ.get("PYTHONPATH")) if p)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"labkit serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("labkit serve did not answer /health within 180 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _metrics(base) -> dict:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^labkit_(\w+) ([0-9.e+-]+)$", text, re.M)}


PROMPTS = [f"Here is a short story about {w}. Once upon a time" for w in
           ("a cat", "a dog", "a ship", "a king", "a tree", "a river", "a robot", "a baker")]
CHATS = [[{"role": "user", "content": f"Name a colour that starts with the letter {c}."}] for c in "BGRYPOWT"]


@pytest.fixture(scope="module")
def offline(smollm2):
    """What the offline engine answers to the same prompts (greedy, stopping at EOS), as text: the model on the
    server's device in its dtype, with the server's default attention (Triton kernels on a GPU)."""
    from labkit import models

    dev = env.device()
    model, tok = smollm2 if dev.type == "cpu" else models.load(MODEL, device=dev)
    torch.set_num_threads(1)
    eng = serving.Engine(model, serving.EngineConfig(max_batch=16, num_blocks=128, max_model_len=1024,
                                                     kernels=serving.default_kernels(dev)),
                         eos_token_id=tok.eos_token_id)
    ids = [tok(p)["input_ids"] for p in PROMPTS] + [chat_prompt_ids(tok, m) for m in CHATS]
    outs = eng.generate(ids, NEW)
    return [tok.decode([t for t in o if t != tok.eos_token_id], skip_special_tokens=True) for o in outs]


async def _httpx_stream(client, base, prompt):
    text, chunks = "", 0
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NEW, "stream": True, "temperature": 0}
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text, chunks
            text += json.loads(line[6:])["choices"][0]["text"]
            chunks += 1
    raise AssertionError("stream ended without data: [DONE]")


async def _openai_stream(client, messages):
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW, stream=True)
    text = ""
    async for chunk in stream:
        text += chunk.choices[0].delta.content or ""
    return text


def test_sixteen_concurrent_streams_equal_offline_engine(server, offline):
    async def main():
        oa = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)
        async with httpx.AsyncClient(timeout=300) as client:
            jobs = [_httpx_stream(client, server, p) for p in PROMPTS] + [_openai_stream(oa, m) for m in CHATS]
            return await asyncio.gather(*jobs)

    t0 = time.time()
    results = asyncio.run(main())
    texts = [r[0] if isinstance(r, tuple) else r for r in results]
    assert all(r[1] >= 1 for r in results[:len(PROMPTS)])
    assert sum(len(t) > 0 for t in offline) >= 12  # real answers, not an immediate end of sequence
    assert texts == offline, list(zip(texts, offline))
    m = _metrics(server)
    assert m["tokens_served_total"] >= 16 and m["running_sequences"] == 0, m
    assert m["free_kv_blocks"] == m["kv_blocks_total"], m
    print(f"16 streams in {time.time() - t0:.1f} s")


def test_non_streaming_and_models(server, offline):
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": NEW},
                   timeout=300)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline[0], r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)
    chat = client.chat.completions.create(model=MODEL, messages=CHATS[0], max_tokens=NEW)
    assert chat.choices[0].message.content == offline[len(PROMPTS)]
    assert [m.id for m in client.models.list().data] == [MODEL]


BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "smollm2-135m", "prompt": "hi",', 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("max_tokens 0", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
    ("max_tokens negative", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
    ("max_tokens beyond context", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400),
    ("prompt longer than the KV budget", "/v1/completions",
     {"model": MODEL, "prompt": list(range(100, 800)), "max_tokens": 4}, 400),
    ("max_tokens a string", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400),
    ("prompt a number", "/v1/completions", {"model": MODEL, "prompt": 42}, 400),
    ("token id outside the vocabulary", "/v1/completions", {"model": MODEL, "prompt": [5, 10**6]}, 400),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400),
    ("empty message list", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("sampling asked for", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 0.8}, 400),
    ("body not an object", "/v1/completions", [1, 2], 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(server, name, path, body, status):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}{path}", timeout=60, **kw)
    assert r.status_code == status, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and len(err["message"]) > 10, err
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200  # still serving


def test_openai_client_sees_bad_request(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Here is a long story about a lighthouse keeper. Once upon a time",
            "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=300) as client:
        with client.stream("POST", f"{server}/v1/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got == 2:  # measured while the stream is open (leaving the loop closes the response)
                    during = _metrics(server)
                    break
    assert during["running_sequences"] == 1, during  # still generating when the client left
    assert during["free_kv_blocks"] < during["kv_blocks_total"]  # the request held blocks while streaming
    deadline = time.time() + 120
    while True:
        m = _metrics(server)
        if m["free_kv_blocks"] == m["kv_blocks_total"] and m["running_sequences"] == 0:
            break
        assert time.time() < deadline, f"blocks not freed after the client left: {m}"
        time.sleep(0.2)
    assert m["tokens_served_total"] < during["tokens_served_total"] + 400  # it stopped well before max_tokens
