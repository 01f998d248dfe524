"""Triton kernels, each beside the PyTorch reference it is tested against.

On a machine without CUDA the kernels run under Triton's interpreter: this package sets
``TRITON_INTERPRET=1`` before Triton is first imported when no GPU is visible (set it yourself to force the
interpreter on a GPU machine). Under the interpreter fp16 rounds as on a GPU; a cast from fp32 to bf16 truncates
(Triton 3.9), where a GPU rounds to nearest (``rounding.compare_with_torch`` measures it), so bf16 results are
compared with tolerances on a CPU and bit for bit only on the GPU. A ``tl.dot`` of bf16 operands multiplies their
raw 16-bit patterns under that interpreter (``rounding.dot_matches_torch``; fp16 is right): the tensor-core GEMV
tests use fp16 activations on a CPU.
"""
import os as _os


def _use_interpreter_without_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        _os.environ.setdefault("TRITON_INTERPRET", "1")


_use_interpreter_without_gpu()
