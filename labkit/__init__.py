"""labkit: the helper package of LLM Inference Lab.

One flat module per concept (env, models, data, quant, gptq, qat, evaluate, attention, kernels, fastgen,
bench, ...). Importing ``labkit`` is cheap; import the module you need. Its one side effect: a logging filter
that drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" notice. On CPUs with
AVX512-BF16, importing bitsandbytes tries to fetch an optional 4-bit GEMM from the Hugging Face hub through the
``kernels`` package and logs that notice when it cannot (no ``kernels`` package, or no network); bitsandbytes then
uses its own CPU kernel, which is what every CPU figure in this workbook measures.
"""
import logging as _logging

__version__ = "0.1.0"

__all__ = ["__version__"]


class _DropKernelsCommunityNotice(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsCommunityNotice())
