"""``labkit serve``: an OpenAI-compatible HTTP server over ``labkit.serving.Engine`` (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the model's chat template), streamed as
server-sent events (``data: {json}`` chunks, then ``data: [DONE]``) or returned whole; ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text: queue length, running sequences, free KV blocks, tokens
served). Decoding is greedy: a request asking for sampling (``temperature`` > 0) is refused, not silently changed.

Bad input gets an OpenAI-style error ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, and the
server keeps serving. One engine thread runs ``Engine.step()`` in a loop; HTTP handlers hand it requests and read
their tokens from an ``asyncio.Queue``; a client that goes away mid-stream cancels its sequence, whose blocks are
freed at once.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

from labkit import env
from labkit.env import LabkitError

try:
    from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
except ImportError:  # pragma: no cover
    BaseModel = object
try:  # at module level: FastAPI resolves the handlers' (string) annotations in this module's globals
    from fastapi import Request as HttpRequest
except ImportError:  # pragma: no cover
    HttpRequest = None


# ---------------------------------------------------------------------------------------------- request schema
if BaseModel is not object:
    class _Base(BaseModel):
        model_config = ConfigDict(extra="ignore")

    class CompletionRequest(_Base):
        model: StrictStr
        prompt: StrictStr | list[StrictInt]
        max_tokens: StrictInt = 16
        stream: StrictBool = False
        temperature: StrictFloat | StrictInt | None = None

    class ChatMessage(_Base):
        role: StrictStr
        content: StrictStr

    class ChatRequest(_Base):
        model: StrictStr
        messages: list[ChatMessage]
        max_tokens: StrictInt | None = None
        max_completion_tokens: StrictInt | None = None
        stream: StrictBool = False
        temperature: StrictFloat | StrictInt | None = None


class ApiError(Exception):
    """An error the client caused: HTTP ``status`` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- engine thread
class AsyncEngine:
    """Runs ``engine.step()`` on a thread; ``submit`` returns a sequence and a queue that receives its tokens."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.queues: dict[str, tuple] = {}
        self.requests_total = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def submit(self, req) -> tuple:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self.lock:
            seq = self.engine.add(req)  # LabkitError here: it can never fit (the handler answers 400)
            self.queues[seq.id] = (loop, q)
            self.requests_total += 1
        self.wake.set()
        return seq, q

    def cancel(self, seq) -> None:
        with self.lock:
            self.engine.cancel(seq)
            self.queues.pop(seq.id, None)

    def stats(self) -> dict:
        with self.lock:
            sch = self.engine.scheduler
            return {"queue_length": len(sch.waiting), "running_sequences": len(sch.running),
                    "free_kv_blocks": sch.blocks.num_free, "kv_blocks_total": sch.blocks.num_blocks,
                    "tokens_served_total": self.engine.tokens_served, "requests_total": self.requests_total,
                    "preemptions_total": sch.preemptions}

    def _run(self) -> None:
        while not self.stopped:
            with self.lock:
                busy = self.engine.has_work()
                try:
                    events = self.engine.step() if busy else []
                except Exception:  # a bug must not leave every client waiting: end all requests with an error
                    import traceback

                    traceback.print_exc()
                    sch = self.engine.scheduler
                    for seq in list(sch.running) + list(sch.waiting):
                        sch.remove(seq, "error")
                    events = []
                    for loop, q in self.queues.values():
                        loop.call_soon_threadsafe(q.put_nowait, (None, "error"))
                    self.queues.clear()
                out = [(self.queues.get(seq.id), seq, tok) for seq, tok in events]
                for _, seq, _ in out:
                    if seq.finish_reason is not None:
                        self.queues.pop(seq.id, None)
            for target, seq, tok in out:
                if target is not None:
                    loop, q = target
                    loop.call_soon_threadsafe(q.put_nowait, (tok, seq.finish_reason))
            if not busy:
                self.wake.wait(0.05)
                self.wake.clear()
            else:  # a lock is not fair: without a pause between steps, a fast device starves /metrics and cancels
                time.sleep(2e-4)


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine, tokenizer, model_name: str):
    """The FastAPI app over ``engine`` (a ``labkit.serving.Engine``) and its tokenizer."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from labkit import serving

    app = FastAPI(title="labkit serve")
    core = AsyncEngine(engine)
    app.state.core = core
    created = int(time.time())
    max_len = engine.cfg.max_model_len

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def parse(request: HttpRequest, schema):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                                "send a JSON object.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(x) for x in err["loc"])
            raise ApiError(400, f"Invalid value for '{param}': {err['msg']}.", param=param) from None
        if body.model != model_name:
            raise ApiError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}' "
                                "(see GET /v1/models).", param="model", code="model_not_found")
        if body.temperature not in (None, 0, 0.0):
            raise ApiError(400, "This server decodes greedily: set temperature to 0 (or leave it out).",
                           param="temperature")
        return body

    vocab = engine.runner.cfg.vocab

    def check_tokens(prompt_ids: list, max_tokens: int) -> None:
        if not prompt_ids:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"Token ids must lie in [0, {vocab}); got {bad[:3]}.", param="prompt")
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
        if len(prompt_ids) + max_tokens > max_len:
            raise ApiError(400, f"This model's context is {max_len} tokens: the prompt has {len(prompt_ids)} and "
                                f"max_tokens asks for {max_tokens}. Shorten the prompt or lower max_tokens.",
                           param="max_tokens", code="context_length_exceeded")

    def submit(prompt_ids: list, max_tokens: int):
        check_tokens(prompt_ids, max_tokens)
        try:
            return core.submit(serving.Request(list(prompt_ids), max_tokens))
        except LabkitError as exc:
            raise ApiError(400, str(exc), param="prompt", code="kv_budget_exceeded") from None

    async def tokens(seq, q):
        """Yield (token, finish_reason) until the sequence ends; cancel it if the consumer goes away."""
        try:
            while True:
                tok, reason = await q.get()
                if tok is None:  # the engine failed (its traceback is in the server's log)
                    raise ApiError(500, "The engine failed on this request; see the server log.", kind="server_error")
                yield tok, reason
                if reason is not None:
                    return
        finally:
            if seq.finish_reason is None:
                core.cancel(seq)

    def sse(payload) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def text_deltas(gen):
        """(text delta, finish_reason) from tokens: decode the whole answer so far, emit what is new (a trailing
        partial UTF-8 character is held back until complete)."""
        async def run():
            ids, sent = [], ""
            async for tok, reason in gen:
                if reason != "stop" or tok not in engine.eos:
                    ids.append(tok)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd") and reason is None:
                    continue
                yield text[len(sent):], reason, len(ids)
                sent = text
        return run()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "labkit", "max_model_len": max_len}]}

    @app.get("/metrics")
    async def metrics():
        s = core.stats()
        lines = []
        for key, kind, doc in (("queue_length", "gauge", "requests waiting for admission"),
                               ("running_sequences", "gauge", "sequences in the running batch"),
                               ("free_kv_blocks", "gauge", "KV cache blocks on the free list"),
                               ("kv_blocks_total", "gauge", "KV cache blocks in the pool"),
                               ("tokens_served_total", "counter", "output tokens produced"),
                               ("requests_total", "counter", "requests accepted"),
                               ("preemptions_total", "counter", "sequences preempted (recomputed later)")):
            lines += [f"# HELP labkit_{key} {doc}", f"# TYPE labkit_{key} {kind}", f"labkit_{key} {s[key]}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def event_stream(seq, chunks) -> StreamingResponse:
        """Server-sent events of ``chunks`` (dicts) ending in ``[DONE]``; a client that goes away mid-stream has its
        sequence cancelled, which frees its blocks at once."""
        async def stream():
            try:
                async for chunk in chunks:
                    yield sse(chunk)
                yield "data: [DONE]\n\n"
            finally:
                if seq.finish_reason is None:
                    core.cancel(seq)
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await parse(request, CompletionRequest)
        ids = body.prompt if isinstance(body.prompt, list) else tokenizer(body.prompt)["input_ids"]
        seq, q = submit(ids, body.max_tokens)
        rid, now = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
        deltas = text_deltas(tokens(seq, q))
        if body.stream:
            async def chunks():
                async for delta, reason, _ in deltas:
                    yield {**head, "choices": [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]}
            return event_stream(seq, chunks())
        text, reason, n = "", None, 0
        async for delta, reason, n in deltas:
            text += delta
        return {**head, "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await parse(request, ChatRequest)
        if not body.messages:
            raise ApiError(400, "messages is empty: send at least one message.", param="messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = 16 if max_tokens is None else max_tokens
        ids = chat_prompt_ids(tokenizer, [m.model_dump() for m in body.messages])
        seq, q = submit(ids, max_tokens)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        head = {"id": rid, "created": now, "model": model_name}
        deltas = text_deltas(tokens(seq, q))
        if body.stream:
            async def chunks():
                yield {**head, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                async for delta, reason, _ in deltas:
                    yield {**head, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": delta} if delta else {},
                                        "finish_reason": reason}]}
            return event_stream(seq, chunks())
        text, reason, n = "", None, 0
        async for delta, reason, n in deltas:
            text += delta
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    return app


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ending with the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # a BatchEncoding in recent transformers
        out = out["input_ids"]
    return list(out)


# ---------------------------------------------------------------------------------------------- CLI
def cli_main(argv: list[str]) -> int:
    """``labkit serve``: load a model, build the engine, serve HTTP until interrupted."""
    p = argparse.ArgumentParser(prog="labkit serve", description="An OpenAI-compatible server over labkit's engine "
                                "(greedy decoding; /v1/completions, /v1/chat/completions, /v1/models, /health, "
                                "/metrics)")
    p.add_argument("--model", default="smollm2-135m", help="a labkit model name (default: the embedded SmolLM2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences running at once")
    p.add_argument("--num-blocks", type=int, default=256, help="KV cache blocks in the pool")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, default=1024, help="prompt + answer limit per request")
    p.add_argument("--chunk-size", type=int, default=64, help="chunked prefill: prompt tokens per step (0: off)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto",
                   help="attention: triton (paged Triton kernels, CUDA graphs; a GPU), torch (the PyTorch reference); "
                        "auto: triton on a GPU, torch on a CPU")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        raise LabkitError(f"--port {args.port} is not a TCP port (1-65535)")
    for mod in ("fastapi", "uvicorn"):
        env.require_package(mod, "labkit serve")
    import torch
    import uvicorn

    from labkit import models, serving

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = env.device()
    kernels = serving.default_kernels(dev) if args.kernels == "auto" else args.kernels
    if kernels == "triton" and dev.type != "cuda":
        raise LabkitError("--kernels triton needs a CUDA GPU and none is visible here (on a CPU Triton would run under "
                          "its interpreter, far too slowly to serve); use --kernels torch or auto")
    cfg = serving.EngineConfig(max_batch=args.max_batch, num_blocks=args.num_blocks, block_size=args.block_size,
                               max_model_len=args.max_model_len, chunk_size=args.chunk_size or None,
                               prefix_caching=not args.no_prefix_caching, kernels=kernels)
    model, tokenizer = models.load(args.model, device=dev)
    if tokenizer is None:
        raise LabkitError(f"{args.model} has no tokenizer; labkit serve needs one (use smollm2-135m or a hub model)")
    engine = serving.Engine(model, cfg, eos_token_id=tokenizer.eos_token_id, log_steps=False)  # runs for days
    app = create_app(engine, tokenizer, args.model)
    print(f"labkit serve: {model.labkit_info.label}, {kernels} attention, on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
