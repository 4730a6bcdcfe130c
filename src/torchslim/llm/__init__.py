"""Methods made for large models: block-by-block calibration (``blocks``), GPTQ, AWQ and SmoothQuant for
quantization, SparseGPT and Wanda for sparsity."""

from torchslim.llm.quantize import GPTQConfig

__all__ = ["GPTQConfig"]
