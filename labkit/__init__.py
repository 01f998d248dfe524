"""labkit: the helper package of LLM Inference Lab.

One flat module per concept (env, models, data, quant, gptq, qat, evaluate, attention, kernels, fastgen,
bench, ...). Importing ``labkit`` is cheap and has no side effects; import the module you need.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
