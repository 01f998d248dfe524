"""Triton kernels, each beside the PyTorch reference it is tested against.

On a machine without CUDA the kernels run under Triton's interpreter: this package sets
``TRITON_INTERPRET=1`` before Triton is first imported when no GPU is visible (set it yourself to force the
interpreter on a GPU machine). Under the interpreter fp16 is exact enough to test; bf16 math is not (see
the tests), so bf16 is tested on the GPU only.
"""
import os as _os


def _use_interpreter_without_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        _os.environ.setdefault("TRITON_INTERPRET", "1")


_use_interpreter_without_gpu()
