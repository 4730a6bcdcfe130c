"""Methods made for large models: block-by-block calibration (``llm.blocks``), GPTQ for quantization
(``llm.quantize``, the ``ts.quantize`` method ``gptq``), SparseGPT and Wanda for sparsity (``llm.sparsegpt``; the
``ts.prune`` solver ``sparsegpt`` and importance ``wanda``). Importing this package loads none of them."""
