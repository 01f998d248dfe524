"""Past one device: tensor parallelism, pipeline parallelism and sharding, on the engine PyTorch ships.

Nothing here talks to a network socket by itself: every collective is a ``torch.distributed`` call on a process
group (gloo on CPU processes, NCCL on GPUs), the tensor-parallel split is a *plan* (data) applied by
``torch.distributed.tensor.parallel.parallelize_module``, the pipeline is ``torch.distributed.pipelining``'s
``PipelineStage`` driven by ``ScheduleGPipe`` / ``Schedule1F1B``, and sharding over memory budgets is accelerate's
``infer_auto_device_map``. Real processes are started by ``torchrun`` (``python -m torch.distributed.run``):

    launch(["tp", "allreduce"], nproc=3, model="smollm2-135m")   # -> a dict of what rank 0 measured

Tensor parallelism of a Llama decoder layer (Megatron-LM's split, Shoeybi et al. 2019): q/k/v and gate/up are split
by output columns (each rank owns whole heads and a slice of the MLP), o_proj and down_proj by input rows, so each
block ends in one all-reduce of a (tokens, hidden) tensor: two all-reduces per layer. The world size must divide the
query heads *and* the KV heads (SmolLM2: 9 and 3 -> 1 or 3; the 7B shape: 32 and 32 -> 2, 4, 8).

A pipeline of p stages over m micro-batches idles (p - 1) / (m + p - 1) of the time when stages are balanced
(GPipe, Huang et al. 2019). ``pp_bubble`` measures it as 1 - (time inside the stage) / (wall time of the step).

Pure arithmetic (bytes per token, the ring all-reduce model, the bubble, the decode model) is at the bottom.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from labkit import env
from labkit.env import LabkitError

BACKENDS = ("gloo", "nccl")
TASKS = ("tp", "hf_tp", "allreduce", "pp", "die")
# A small random Llama with the 7B head layout (32 query heads = 32 KV heads, head_dim hidden/32, MLP 2.6875x):
# it splits at 2, 4 and 8 like the 7B shape and runs in seconds on a CPU. Random weights: never a quality figure.
SMALL_7B_LAYOUT = "llama2-7b-layout-small"
DEFAULT_TIMEOUT_S = 30.0  # process-group timeout inside a worker: a dead peer surfaces as an error by then


def small_7b_layout_shape():
    """The ``SMALL_7B_LAYOUT`` shape: hidden 1024, 32 heads and 32 KV heads, MLP 2752, 4 layers, vocab 2048."""
    from labkit.models import ModelShape

    return ModelShape(1024, 2752, 4, 32, 32, 2048, 512)


def model_shape(name: str):
    """The ``ModelShape`` of a model name this module knows (presets, the small 7B layout, SmolLM2)."""
    from labkit import models

    if name == SMALL_7B_LAYOUT:
        return small_7b_layout_shape()
    if name == models.EMBEDDED:
        return models.PRESETS["smollm2-135m-shape"]
    if name in models.PRESETS:
        return models.PRESETS[name]
    raise LabkitError(f"Unknown model {name!r} for labkit.parallel; use {models.EMBEDDED!r}, {SMALL_7B_LAYOUT!r} "
                      f"or one of {', '.join(models.PRESETS)}.")


def load_model(name: str, dtype=None):
    """(model, tokenizer) on CPU: SmolLM2 (real weights) or a random-weight shape (seeded: equal on every rank)."""
    import torch

    from labkit import models

    dtype = dtype or torch.float32
    if name == SMALL_7B_LAYOUT:
        model = models._random_model(small_7b_layout_shape(), torch.device("cpu"), dtype, "sdpa")
        model.labkit_info = models.ModelInfo(name, True, None, "sdpa", "cpu", str(dtype).replace("torch.", ""),
                                             "random init (std 0.02)")
        return model.eval(), None
    return models.load(name, device="cpu", dtype=dtype, attn="sdpa")


# ---------------------------------------------------------------------------------------------- validation
def check_tp(shape, world: int) -> None:
    """Raise a LabkitError unless ``world`` splits the query heads, the KV heads and the MLP evenly."""
    if world < 1:
        raise LabkitError(f"world size {world} is not a positive number of processes.")
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    bad = [f"{what} {n}" for what, n in (("query heads", heads), ("KV heads", kv),
                                          ("MLP width", shape.intermediate_size)) if n % world]
    if bad:
        ok = [w for w in range(1, heads + 1) if heads % w == 0 and kv % w == 0 and shape.intermediate_size % w == 0]
        raise LabkitError(f"tensor parallelism over {world} processes needs the world size to divide the "
                          f"{' and the '.join(bad)}; this model splits over {ok} processes only.")


def check_backend(backend: str, world: int) -> None:
    """Raise a LabkitError for an unknown backend, or NCCL asked for with fewer GPUs than processes."""
    if backend not in BACKENDS:
        raise LabkitError(f"backend {backend!r} is not one of {BACKENDS}: gloo for CPU processes, nccl for GPUs.")
    if backend == "nccl":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < world:
            raise LabkitError(f"NCCL over {world} processes needs {world} GPUs (one per process); {n} visible here. "
                              f"Use --backend gloo on CPU, or fewer processes.")


def check_pp(n_layers: int, stages: int, microbatches: int, batch: int) -> None:
    """Raise a LabkitError unless every stage gets a layer and the batch splits into the micro-batches."""
    if stages < 2 or stages > n_layers:
        raise LabkitError(f"a pipeline needs 2..{n_layers} stages for {n_layers} layers; got {stages}.")
    if microbatches < 1 or batch % microbatches:
        raise LabkitError(f"batch {batch} does not split into {microbatches} equal micro-batches; "
                          "pick a micro-batch count that divides the batch.")


# ---------------------------------------------------------------------------------------------- tensor parallel
def tp_plan() -> dict:
    """The tensor-parallel plan of one Llama decoder layer, as data: module path -> ParallelStyle.

    Column-wise: the output features (heads; MLP columns) are split, each rank keeps a local slice.
    Row-wise: the input features are split and the partial outputs are all-reduced (one per block).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
    }


def apply_tp(model, mesh) -> None:
    """Split every decoder layer of a Llama ``model`` over ``mesh`` with ``tp_plan()`` (in place).

    Embedding, norms and LM head stay replicated. The attention module reshapes with ``view(..., -1, head_dim)``,
    so after the split it sees its local heads without being told.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    check_tp(model.config, mesh.size())
    for layer in model.model.layers:
        parallelize_module(layer, mesh, tp_plan())


def hf_tp_load(path: str, world: int, dtype=None):
    """transformers' own tensor parallelism under torchrun: the model's ``base_model_tp_plan`` over ``world`` ranks.

    Newer transformers take ``distributed_config=DistributedConfig(tp_size=..., tp_plan="auto")``; older 5.x took
    ``tp_plan="auto"`` directly. Whether the layers were really split is checked by the caller (local q_proj rows).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    try:
        from transformers import DistributedConfig
    except ImportError:
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype).eval()
    try:
        cfg = DistributedConfig(tp_size=world, tp_plan="auto")
    except TypeError:
        cfg = DistributedConfig(tp_size=world)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=cfg, dtype=dtype).eval()


class AllReduceCounter:
    """Counts the all-reduces the process group is asked for, and their bytes, while active.

    A ``TorchDispatchMode`` sees every functional collective that DTensor issues
    (``_c10d_functional.all_reduce``), with the tensor it reduces: we add up ``numel * element_size``. This is the
    payload of each all-reduce; a ring implementation puts 2 (p - 1) / p of it on each rank's link.
    """

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self.shapes = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)  # DTensor: _c10d_functional.all_reduce; dist.all_reduce: c10d.allreduce_
                if ("all_reduce" in name or "allreduce" in name) and args:
                    t = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
                    if not hasattr(t, "numel"):
                        return func(*args, **(kwargs or {}))
                    counter.calls += 1
                    counter.bytes += t.numel() * t.element_size()
                    counter.shapes.append(tuple(t.shape))
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------------- pipeline
def balanced_split(shape, stages: int) -> list[int]:
    """First layer of each stage so that matmul parameters per stage are as even as possible.

    The LM head (vocab x hidden) sits on the last stage and weighs as much as several layers; SmolLM2's head is
    about 8 of its layers. Returns ``stages + 1`` boundaries: stage s owns layers ``[b[s], b[s+1])``.
    """
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.num_key_value_heads * shape.head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * i
    head = shape.vocab_size * h
    L = shape.num_hidden_layers
    total = L * layer + head
    bounds, start = [0], 0
    for s in range(1, stages):
        target = total * s / stages
        start = max(start + 1, min(L - (stages - s), round(target / layer)))
        bounds.append(start)
    return bounds + [L]


def make_stage_module(model, lo: int, hi: int, first: bool, last: bool):
    """An ``nn.Module`` of layers ``[lo, hi)`` (+ embedding on the first stage, norm and LM head on the last).

    Input: token ids (batch, T) on the first stage, hidden states (batch, T, hidden) on the others.
    Output: hidden states, or logits (batch, T, vocab) on the last stage. Causal attention (sdpa, no mask).
    """
    import torch

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = model.model.embed_tokens if first else None
            self.layers = torch.nn.ModuleList(model.model.layers[lo:hi])
            self.rotary = model.model.rotary_emb
            self.norm = model.model.norm if last else None
            self.head = model.lm_head if last else None

        def forward(self, x):
            h = self.embed(x) if first else x  # (batch, T, hidden)
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            pe = self.rotary(h, pos)
            for layer in self.layers:
                h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
                h = h[0] if isinstance(h, tuple) else h
            return self.head(self.norm(h)) if last else h

    return Stage().eval()


# ---------------------------------------------------------------------------------------------- sharding / offload
def layer_bytes(model) -> int:
    """Bytes of the largest decoder layer: the smallest unit accelerate places on a device."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    return max(v for k, v in sizes.items() if k.startswith("model.layers.") and k.count(".") == 2)


def offload_map(model, budget_bytes: int, main: str = "cpu") -> dict:
    """accelerate's device map for ``model`` with ``budget_bytes`` on ``main`` (layers are never split).

    ``main`` is the device under pressure: a GPU index on a GPU (the rest goes to ``"cpu"``), ``"cpu"`` on a
    CPU-only machine (the rest goes to ``"disk"``, read back from files on every forward).
    """
    from accelerate import infer_auto_device_map

    need = layer_bytes(model)
    if budget_bytes < need:
        raise LabkitError(f"max_memory of {_mib(budget_bytes)} on {main!r} cannot hold one decoder layer "
                          f"({_mib(need)}); give it at least that much.")
    overflow = "disk" if main == "cpu" else "cpu"
    return infer_auto_device_map(model, max_memory={main: int(budget_bytes), overflow: 1 << 40},
                                 no_split_module_classes=["LlamaDecoderLayer"])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def resident_bytes(model, device_map: dict, main="cpu") -> int:
    """Bytes of the modules ``device_map`` puts on ``main``."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    return sum(sizes[k] for k, v in device_map.items() if v == main)


def offload_decode(budget_bytes: int, new_tokens: int = 4, prompt_len: int = 8, iters: int = 2,
                   name: str = "smollm2-135m") -> dict:
    """Decode ms/token of ``name`` held whole, then with ``budget_bytes`` resident and the rest offloaded.

    CPU-only: the rest goes to disk (accelerate's offload folder, memory-mapped weights copied in per layer and
    forward); on a GPU the budget is GPU 0's and the rest stays in CPU memory. Same tokens both ways (checked).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, like every rank of the parallel runs (and no oversubscribed cores)
    try:
        return _offload_decode(budget_bytes, new_tokens, prompt_len, iters, name)
    finally:
        torch.set_num_threads(threads)


def _offload_decode(budget_bytes, new_tokens, prompt_len, iters, name) -> dict:
    import torch
    from accelerate import dispatch_model
    from accelerate.utils import compute_module_sizes

    from labkit import bench, models, roofline

    gpu = env.has_cuda()
    main = 0 if gpu else "cpu"
    model, tok = models.load(name, device="cpu", dtype=torch.float32)
    dmap = offload_map(model, budget_bytes, main)
    total = compute_module_sizes(model)[""]
    ids = tok("The capital of France is", return_tensors="pt").input_ids[:, :prompt_len]
    dev = torch.device("cuda", 0) if gpu else torch.device("cpu")
    whole = model.to(dev)
    r_whole = bench.time_generate(whole, ids.to(dev), new_tokens, warmup=1, iters=iters)
    with torch.inference_mode():
        t_whole = whole.generate(ids.to(dev), max_new_tokens=new_tokens, do_sample=False)
    whole.to("cpu")
    with tempfile.TemporaryDirectory() as folder:
        sharded = dispatch_model(model, device_map=dmap, offload_dir=folder)
        r_off = bench.time_generate(sharded, ids.to(dev), new_tokens, warmup=1, iters=iters)
        with torch.inference_mode():
            t_off = sharded.generate(ids.to(dev), max_new_tokens=new_tokens, do_sample=False)
    resident = resident_bytes(model, dmap, main)
    kv_tok = roofline.kv_bytes_per_token(model_shape(name), 4)
    left = max(budget_bytes - resident, 0)
    return {
        "model": name, "budget_bytes": int(budget_bytes), "model_bytes": int(total), "resident_bytes": int(resident),
        "offloaded_to": "cpu" if gpu else "disk",
        "layers_offloaded": sum(1 for k, v in dmap.items() if v != main and k.startswith("model.layers")),
        "ms_per_token_whole": r_whole["decode_ms_per_token"], "ms_per_token_offload": r_off["decode_ms_per_token"],
        "offload_ms_per_token": r_off["decode_ms_per_token"] - r_whole["decode_ms_per_token"],
        "same_tokens": bool(torch.equal(t_whole.cpu(), t_off.cpu())),
        "kv_bytes_per_token": kv_tok, "kv_budget_bytes": int(left), "kv_tokens_left": int(left // kv_tok),
        "device_map": {k: str(v) for k, v in dmap.items()},
    }


# ---------------------------------------------------------------------------------------------- launcher
@dataclass
class Launch:
    """A finished torchrun: exit code, wall seconds, rank 0's result (None when it failed), the output."""

    returncode: int
    seconds: float
    result: dict | None
    output: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_raw(tasks, nproc: int, *, backend: str = "gloo", model: str = "smollm2-135m", pp_model: str = "smollm2-135m",
               timeout_s: float = 240, pg_timeout_s: float = DEFAULT_TIMEOUT_S, extra: list[str] | None = None,
               monitor_interval_s: float | None = None) -> Launch:
    """Start ``nproc`` processes with torchrun running ``tasks`` and wait (at most ``timeout_s``).

    Validates the request first (world size vs heads for ``tp``, NCCL vs GPUs): nothing starts when it is bad.
    Each process uses one thread (OMP_NUM_THREADS=1): on a CPU, processes rather than threads share the cores.
    A failed rank ends the run: torchrun stops the others when it notices (every ``monitor_interval_s``), and a
    rank waiting in a collective on a dead peer raises by itself (gloo: connection closed; at the latest after
    the process-group timeout ``pg_timeout_s``).
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise LabkitError(f"unknown task(s) {unknown}; choose from {TASKS}.")
    check_backend(backend, nproc)
    if "tp" in tasks or "hf_tp" in tasks:
        check_tp(model_shape(model), nproc)
    if "pp" in tasks:
        check_pp(model_shape(pp_model).num_hidden_layers, nproc, 1, 1)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0",
               *(["--monitor-interval", str(monitor_interval_s)] if monitor_interval_s else []),
               "-m", "labkit.parallel", "--tasks", ",".join(tasks), "--backend", backend, "--model", model, "--pp-model", pp_model,
               "--out", out, "--pg-timeout", str(pg_timeout_s), *(extra or [])]
        envv = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                    PYTHONPATH=os.pathsep.join([str(env.repo_root()), os.environ.get("PYTHONPATH", "")]),
                    TORCHELASTIC_ERROR_FILE=os.path.join(out, "error.json"))
        if backend == "gloo":  # a CPU run stays on the CPU on a GPU machine too (transformers' TP would take cuda:rank)
            envv["CUDA_VISIBLE_DEVICES"] = ""
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=envv, capture_output=True, text=True, timeout=timeout_s)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, output = 124, f"torchrun did not finish within {timeout_s:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
        seconds = time.perf_counter() - t0
        path = Path(out) / "rank0.json"
        result = json.loads(path.read_text()) if rc == 0 and path.exists() else None
    return Launch(rc, seconds, result, output)


def launch(tasks, nproc: int, **kw) -> dict:
    """``launch_raw`` that raises a LabkitError with the processes' last output when torchrun fails."""
    run = launch_raw(tasks, nproc, **kw)
    if run.returncode != 0 or run.result is None:
        lines = run.output.strip().splitlines()
        # the first traceback (a failing rank's own; torchrun's summary at the end names the rank, not the error)
        tb = next((i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line), None)
        tail = "\n".join((lines[tb:tb + 30] + ["..."] if tb is not None else []) + lines[-12:])
        raise LabkitError(f"torchrun with {nproc} processes failed (exit {run.returncode}):\n{tail}")
    run.result["launch_seconds"] = run.seconds
    return run.result


# ---------------------------------------------------------------------------------------------- worker
def _prompt_ids(tok, vocab: int, batch: int, prompt_len: int):
    import torch

    if tok is not None:
        text = "Tensor parallelism splits every layer across devices, and pipeline parallelism splits the layers."
        ids = tok(text, return_tensors="pt").input_ids[:, :prompt_len]
        return ids.repeat(batch, 1)
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g)


def _greedy(model, ids, n: int):
    import torch

    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _task_tp(args, rank, world, dev, hf: bool = False) -> dict:
    """Logits and greedy tokens of the split model vs the whole model; all-reduce count and bytes; decode time."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from labkit import bench, models

    model, tok = load_model(args.model)
    model = model.to(dev)  # the one-process reference runs on the same kind of device as the split model
    ids = _prompt_ids(tok, model.config.vocab_size, 1, args.prompt_len).to(dev)
    out = {"model": args.model, "random_weights": tok is None, "world": world, "device": str(dev),
           "backend": dist.get_backend(), "prompt_len": ids.shape[1],
           "new_tokens": args.new_tokens, "split": "transformers tp_plan='auto'" if hf else "labkit tp_plan()"}
    if rank == 0:  # the one-process reference, computed on rank 0 while the others wait
        with torch.inference_mode():
            ref_logits = model(ids).logits
        ref_tokens = _greedy(model, ids, args.new_tokens)
        if args.time_decode:
            out["single_decode"] = bench.time_generate(model, ids, args.new_tokens, warmup=1, iters=args.iters)
    dist.barrier()
    if hf:
        del model
        path = str(models.smollm2_checkpoint()) if args.model == models.EMBEDDED else args.model
        tp_model = hf_tp_load(path, world)
    else:
        tp_model = model
        apply_tp(tp_model, init_device_mesh(dev.type, (world,)))
    ids_d = ids
    with torch.inference_mode(), AllReduceCounter() as counter, CommDebugMode() as comm:
        logits = tp_model(ids_d).logits
    tokens = _greedy(tp_model, ids_d, args.new_tokens)
    out.update(allreduce_calls=counter.calls, allreduce_bytes=counter.bytes,
               allreduce_shapes=sorted(set(counter.shapes)),
               commdebug_counts={str(k): v for k, v in comm.get_comm_counts().items()},
               layers=tp_model.config.num_hidden_layers, hidden=tp_model.config.hidden_size,
               bytes_per_element=logits.element_size(),
               local_q_out=int(tp_model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0]
                               if hasattr(tp_model.model.layers[0].self_attn.q_proj.weight, "to_local")
                               else tp_model.model.layers[0].self_attn.q_proj.weight.shape[0]))
    if args.time_decode:
        out["tp_decode"] = bench.time_generate(tp_model, ids_d, args.new_tokens, warmup=1, iters=args.iters)
    if rank == 0:
        ref = ref_logits.float()
        diff = (logits.float() - ref).abs().max().item()
        out.update(max_abs_logit_diff=diff, logit_scale=ref.abs().max().item(),
                   tokens=tokens.cpu().tolist(), ref_tokens=ref_tokens.cpu().tolist(),
                   tokens_equal=bool(torch.equal(tokens, ref_tokens)))
        if args.time_decode:
            out["decode_speedup"] = out["single_decode"]["decode_ms_per_token"] / out["tp_decode"]["decode_ms_per_token"]
    return out


def _task_allreduce(args, rank, world, dev) -> dict:
    """Median seconds of one ``dist.all_reduce`` per message size (fp32), timed on every rank, rank 0 reported."""
    import statistics

    import torch
    import torch.distributed as dist

    rows = []
    for n in args.sizes:
        x = torch.ones(n, device=dev)
        for _ in range(3):
            dist.all_reduce(x)
        times = []
        for _ in range(args.ar_iters):
            dist.barrier()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        rows.append({"world": world, "bytes": n * 4, "median_s": statistics.median(times), "min_s": min(times)})
    check = torch.full((4,), float(rank + 1), device=dev)
    dist.all_reduce(check)  # the sum 1 + 2 + ... + world on every rank: the collective is doing its job
    if not torch.all(check == world * (world + 1) / 2):
        raise RuntimeError(f"all_reduce gave {check.tolist()} on rank {rank}")
    return {"world": world, "backend": dist.get_backend(), "rows": rows}


def _task_pp(args, rank, world, dev) -> dict:
    """SmolLM2's layers over ``world`` stages: logits vs the whole model, and the bubble per schedule and m."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    model, tok = load_model(args.pp_model)
    shape = model_shape(args.pp_model)
    bounds = [0, shape.num_hidden_layers // 2, shape.num_hidden_layers] if world == 2 and not args.balanced \
        else balanced_split(shape, world)
    lo, hi = bounds[rank], bounds[rank + 1]
    first, last = rank == 0, rank == world - 1
    batch = max(args.microbatches)
    ids = _prompt_ids(tok, model.config.vocab_size, 1, args.prompt_len)
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([ids, torch.randint(3, model.config.vocab_size, (batch - 1, ids.shape[1]), generator=g)])
    ref = None
    if last:
        with torch.inference_mode():
            ref = model(ids).logits
    stage_mod = make_stage_module(model, lo, hi, first, last).to(dev)
    busy = [0.0]

    def timed_forward(mod, fwd):
        def f(*a, **k):
            t0 = time.perf_counter()
            r = fwd(*a, **k)
            busy[0] += time.perf_counter() - t0
            return r
        return f

    stage_mod.forward = timed_forward(stage_mod, stage_mod.forward)
    out = {"model": args.pp_model, "random_weights": tok is None, "stages": world, "bounds": bounds, "batch": batch, "prompt_len": ids.shape[1],
           "rows": []}
    schedules = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}
    with torch.no_grad():
        for sched_name, cls in schedules.items():
            for m in args.microbatches:
                if cls is Schedule1F1B and m < world:
                    continue  # 1F1B needs at least one micro-batch per stage (torch raises otherwise)
                stage = PipelineStage(stage_mod, rank, world, dev)
                sched = cls(stage, n_microbatches=m)
                x = ids.to(dev)
                for rep in range(args.pp_reps + 1):  # the first step is a warm-up (shape inference)
                    dist.barrier()
                    busy[0] = 0.0
                    t0 = time.perf_counter()
                    y = sched.step(x) if first else sched.step()
                    dist.barrier()  # the step ends when the last stage is done, for every rank
                    wall = time.perf_counter() - t0
                    if rep == 0:
                        continue
                    frac = torch.tensor([1.0 - busy[0] / wall, wall, busy[0]])
                    gathered = [torch.zeros(3) for _ in range(world)]
                    dist.all_gather(gathered, frac)
                    row = {"schedule": sched_name, "microbatches": m, "rep": rep,
                           "bubble_per_rank": [float(t[0]) for t in gathered],
                           "wall_s": float(gathered[0][1]), "busy_s": [float(t[2]) for t in gathered],
                           "bubble": float(sum(t[0] for t in gathered) / world),
                           "predicted": bubble_fraction(world, m)}
                    if last:
                        row["max_abs_logit_diff"] = float((y.float() - ref.float()).abs().max())
                        row["logit_scale"] = float(ref.abs().max())
                        row["argmax_equal"] = bool(torch.equal(y.argmax(-1), ref.argmax(-1)))
                    out["rows"].append(row)
    # the last stage holds the comparison with the whole model: hand it to rank 0
    objs = [None] * world
    dist.all_gather_object(objs, [r.get("max_abs_logit_diff") for r in out["rows"]] + 
                           [[r.get("argmax_equal") for r in out["rows"]], [r.get("logit_scale") for r in out["rows"]]])
    lastrows = objs[-1]
    n = len(out["rows"])
    for i, r in enumerate(out["rows"]):
        r["max_abs_logit_diff"], r["argmax_equal"], r["logit_scale"] = lastrows[i], lastrows[n][i], lastrows[n + 1][i]
    return out


def _task_die(args, rank, world, dev) -> dict:
    """Rank ``args.kill_rank`` is killed (SIGKILL) mid-run; the others are inside an all-reduce with it."""
    import signal

    import torch
    import torch.distributed as dist

    x = torch.ones(4, device=dev)
    dist.all_reduce(x)
    if rank == args.kill_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(1000):
        dist.all_reduce(x)  # raises once the peer is gone (or the process-group timeout passes)
    return {"unexpected": "the collectives went on without a peer"}


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of one process under torchrun (``python -m labkit.parallel ...``)."""
    p = argparse.ArgumentParser(prog="python -m labkit.parallel", description="one rank of a labkit.parallel run")
    p.add_argument("--tasks", required=True)
    p.add_argument("--backend", default="gloo", choices=BACKENDS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pp-model", default="smollm2-135m", help="model of the pp task")
    p.add_argument("--out", required=True)
    p.add_argument("--pg-timeout", type=float, default=DEFAULT_TIMEOUT_S)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--time-decode", action="store_true")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 256, 4096, 65536, 262144])
    p.add_argument("--ar-iters", type=int, default=10)
    p.add_argument("--microbatches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    p.add_argument("--pp-reps", type=int, default=1)
    p.add_argument("--balanced", action="store_true", help="pipeline: split layers by parameters, head included")
    p.add_argument("--kill-rank", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.backend == "nccl":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(args.backend, timeout=_dt.timedelta(seconds=args.pg_timeout),
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    results = {}
    try:
        for task in args.tasks.split(","):
            if task in ("tp", "hf_tp"):
                results[task] = _task_tp(args, rank, world, dev, hf=task == "hf_tp")
            elif task == "allreduce":
                results[task] = _task_allreduce(args, rank, world, dev)
            elif task == "pp":
                results[task] = _task_pp(args, rank, world, dev)
            elif task == "die":
                results[task] = _task_die(args, rank, world, dev)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(args.out, "rank0.json").write_text(json.dumps(results, default=float))
    return 0


# ---------------------------------------------------------------------------------------------- pure arithmetic
def allreduce_bytes_per_token_per_layer(shape, bytes_per_element: float) -> float:
    """Payload all-reduced per token per layer by the Megatron split: two (hidden,) vectors (attention, MLP)."""
    return 2 * shape.hidden_size * bytes_per_element


def ring_allreduce_wire_bytes(nbytes: float, p: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes`` over ``p`` ranks: reduce-scatter + all-gather."""
    return 2 * (p - 1) / p * nbytes


def bubble_fraction(p: int, m: int) -> float:
    """GPipe's idle fraction of a balanced ``p``-stage pipeline over ``m`` micro-batches: (p - 1) / (m + p - 1)."""
    return (p - 1) / (m + p - 1)


def fit_ring(rows: list[dict]) -> tuple[float, float]:
    """Least-squares fit of t = 2(p-1)·alpha + 2(p-1)/p · bytes / beta over rows {world, bytes, median_s}.

    Returns (alpha seconds per ring step, beta bytes/s). A model (Hockney's alpha-beta on a ring), fitted to the
    sizes and world sizes measured; beyond them it is an extrapolation.
    """
    import numpy as np

    A = np.array([[2 * (r["world"] - 1), ring_allreduce_wire_bytes(r["bytes"], r["world"])] for r in rows], float)
    t = np.array([r["median_s"] for r in rows], float)
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, t, rcond=None)
    alpha = max(float(alpha), 0.0)
    inv_beta = max(float(inv_beta), 1e-15)
    return alpha, 1.0 / inv_beta


def ring_allreduce_seconds(nbytes: float, p: int, alpha: float, beta: float) -> float:
    """The alpha-beta ring model of one all-reduce of ``nbytes`` over ``p`` ranks (0 for one rank)."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + ring_allreduce_wire_bytes(nbytes, p) / beta


def tp_decode_model(shape, p: int, *, bytes_per_element: float, read_bw: float, alpha: float, beta: float,
                    batch: int = 1, overhead_s: float = 0.0) -> dict:
    """MODEL of one batch-``batch`` decode step at TP ``p``: overhead + weights / (p · bandwidth) + 2L all-reduces.

    Each rank reads 1/p of the layer weights (LM head replicated: read by every rank) at ``read_bw``; then
    2 all-reduces per layer of batch·hidden elements, each costing the ring model; ``overhead_s`` is the part of a
    step that does not shrink with p (Python, launches). No overlap of compute and communication is assumed.
    It is a model, not a measurement.
    """
    from labkit import roofline

    layer_w = (roofline.linear_params(shape) - shape.hidden_size * shape.vocab_size) * bytes_per_element
    head_w = shape.hidden_size * shape.vocab_size * bytes_per_element
    compute = (layer_w / p + head_w) / read_bw
    msg = batch * shape.hidden_size * bytes_per_element
    comm = 2 * shape.num_hidden_layers * ring_allreduce_seconds(msg, p, alpha, beta)
    total = overhead_s + compute + comm
    return {"p": p, "overhead_ms": overhead_s * 1e3, "compute_ms": compute * 1e3, "comm_ms": comm * 1e3,
            "total_ms": total * 1e3}


# ---------------------------------------------------------------------------------------------- CLI
def cli_main(argv: list[str] | None = None) -> int:
    """``labkit bench parallel``: TP, collectives, pipeline and offload; writes parallel.json."""
    from labkit import bench, models, results
    from labkit.cli import positive_int

    p = argparse.ArgumentParser(prog="labkit bench parallel",
                                description="Tensor and pipeline parallelism over torchrun processes, all-reduce "
                                            "latency, CPU/disk offload; writes results/<device>/parallel.json.")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="gloo (CPU processes) or nccl (one GPU each); "
                   "default nccl when 2+ GPUs are visible, else gloo")
    p.add_argument("--tp", type=positive_int, default=2, help="processes for the small 7B-layout model (default 2)")
    p.add_argument("--new-tokens", type=positive_int, default=None, help="decode tokens timed (default 8 CPU, 32 GPU)")
    p.add_argument("--offload-budget-mb", type=float, default=200.0,
                   help="max_memory on the main device for the offload run (SmolLM2 fp32 is ~540 MB)")
    p.add_argument("--reference", action="store_true", help="write results/<device>/ (committed) instead of "
                   "results/local/<device>/")
    args = p.parse_args(argv)
    if args.offload_budget_mb <= 0:
        p.error(f"--offload-budget-mb {args.offload_budget_mb:g}: give a positive budget in MB")
    import torch

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = args.backend or ("nccl" if ngpu >= 2 else "gloo")
    check_backend(backend, args.tp)
    check_tp(small_7b_layout_shape(), args.tp)
    new_tokens = args.new_tokens or (32 if backend == "nccl" else 8)
    records, summary = [], {}
    print(f"[1/4] tensor parallelism of {SMALL_7B_LAYOUT} over {args.tp} {backend} processes, all-reduce sweep",
          flush=True)
    tp = launch(["tp", "allreduce"], args.tp, backend=backend, model=SMALL_7B_LAYOUT,
                extra=["--time-decode", "--new-tokens", str(new_tokens), "--iters", "3",
                       "--sizes", "1,64,1024,16384,262144,1048576"])
    records += [{"what": "tp", **tp["tp"]}, {"what": "allreduce", **tp["allreduce"]}]
    print("[2/4] tensor parallelism of SmolLM2 over 3 gloo processes" if backend == "gloo" else
          "[2/4] SmolLM2 TP 3 runs on gloo only: skipped", flush=True)
    smol = launch(["tp"], 3, backend="gloo", model=models.EMBEDDED) if backend == "gloo" else None
    if smol:
        records.append({"what": "tp", **smol["tp"]})
    print("[3/4] pipeline parallelism of SmolLM2 over 2 stages, 1-8 micro-batches", flush=True)
    pp = launch(["pp"], 2, backend="gloo", model=models.EMBEDDED,
                extra=["--microbatches", "1,2,4,8", "--balanced", "--pp-reps", "2"])
    records.append({"what": "pp", **pp["pp"]})
    print(f"[4/4] accelerate offload under a {args.offload_budget_mb:g} MB budget", flush=True)
    off = offload_decode(int(args.offload_budget_mb * 2**20))
    records.append({"what": "offload", **off})
    shape = small_7b_layout_shape()
    t = tp["tp"]
    gpipe8 = [r for r in pp["pp"]["rows"] if r["schedule"] == "GPipe" and r["microbatches"] == 8]
    summary = {
        "tp2_matches_single": bool(t["tokens_equal"] and t["max_abs_logit_diff"] <= 1e-5 * t["logit_scale"]),
        "tp2_decode_speedup": t["decode_speedup"],
        "tp2_model": SMALL_7B_LAYOUT + " (random weights)", "tp_backend": backend, "tp_device": t["device"],
        "allreduce_bytes_per_token": t["allreduce_bytes"] / t["prompt_len"],  # all layers, counted
        "allreduce_bytes_per_token_per_layer_measured": t["allreduce_bytes"] / t["prompt_len"] / t["layers"],
        "allreduce_bytes_per_token_per_layer_predicted": allreduce_bytes_per_token_per_layer(shape, 4),
        "pp_bubble_measured": sum(r["bubble"] for r in gpipe8) / len(gpipe8),
        "pp_bubble_predicted": bubble_fraction(2, 8),
        "offload_ms_per_token": off["offload_ms_per_token"],
        "offload_to": off["offloaded_to"],
    }
    if smol:
        s = smol["tp"]
        summary["smollm2_tp3_tokens_equal"] = s["tokens_equal"]
        summary["smollm2_tp3_max_abs_logit_diff"] = s["max_abs_logit_diff"]
    path = bench.write_results(results.output_dir(args.reference) / "parallel.json", records, summary)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(worker_main())
    except LabkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
