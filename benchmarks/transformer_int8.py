"""Int8 for a transformer in ONNX Runtime on a real pretrained causal LM (SmolLM2-135M-Instruct, see
``benchmarks.llm``): the float ONNX export against dynamic int8 and static int8 (min-max, percentile, entropy
calibration; with and without SmoothQuant's migration), quantizing every operator against only the products with
weights. For each: cosine of the logits to PyTorch float32, perplexity, file size, and prefill latency of one
256-token window in ONNX Runtime (2 threads, every session timed in one process, alternating, medians).

    python3 -m benchmarks.transformer_int8 [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import torchslim as ts
from benchmarks.harness import arguments, write
from benchmarks.llm import MODEL_DIR, WINDOW, _tokens
from torchslim.export.onnx import OnnxModule, export_onnx
from torchslim.report.markdown import format_bytes, table

CONFIGS: dict[str, dict[str, Any]] = {
    "dynamic int8": {"mode": "dynamic"},
    "static int8, min-max": {},
    "static int8, percentile 99.999": {"calibration": "percentile"},
    "static int8, entropy": {"calibration": "entropy"},
    "static int8, min-max, SmoothQuant 0.5": {"smooth": 0.5},
    "static int8, percentile, SmoothQuant 0.5": {"calibration": "percentile", "smooth": 0.5},
    "static int8, every operator quantized (min-max)": {"weight_matmuls_only": False},
}


def main() -> None:
    options = arguments(__doc__.splitlines()[0])
    import transformers

    if not (MODEL_DIR / "config.json").is_file():
        raise SystemExit(f"no model in {MODEL_DIR}: run python3 -m benchmarks.llm --prepare (or set TORCHSLIM_LLM_DIR)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    model.config.use_cache = False
    ids = _tokens(options.data_root / "text" / "tinyshakespeare.txt", tokenizer, MODEL_DIR / "shakespeare-ids.pt")
    split = int(0.9 * ids.numel())
    evaluation = ts.data.token_windows(ids, WINDOW, max_tokens=1024 if options.quick else 4096, batch_size=2, start=split)
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, split - WINDOW, (8 if options.quick else 32,), generator=generator).tolist()
    calibration = [{"input_ids": torch.stack([ids[s : s + WINDOW] for s in starts[i : i + 4]])} for i in range(0, len(starts), 4)]
    inputs = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])} for b in evaluation]
    with torch.no_grad():
        reference = torch.cat([model(**b).logits for b in inputs])
    base = ts.evaluate(model, evaluation, task="language-modeling")["perplexity"]
    names = list(CONFIGS) if not options.quick else ["dynamic int8", "static int8, min-max", "static int8, percentile, SmoothQuant 0.5"]
    engines: dict[str, OnnxModule] = {}
    results: dict[str, dict[str, Any]] = {}
    example = {"input_ids": ids[:WINDOW].reshape(1, -1), "attention_mask": torch.ones(1, WINDOW, dtype=torch.long)}
    with tempfile.TemporaryDirectory() as folder:
        engines["ONNX float32"] = OnnxModule(export_onnx(model, example, Path(folder) / "fp32.onnx"))
        for name in names:
            started = time.perf_counter()
            calibration_data = [{**b, "attention_mask": torch.ones_like(b["input_ids"])} for b in calibration]
            config = {"method": "onnxruntime", "calibration_batches": len(calibration), **CONFIGS[name]}
            engines[name] = ts.quantize(model, config, data=calibration_data, example_input=example, path=Path(folder) / f"{len(engines)}.onnx").model
            results[name] = {"quantize_seconds": time.perf_counter() - started}
            print(name, f"{results[name]['quantize_seconds']:.0f} s", flush=True)
    for name, engine in engines.items():
        logits = torch.cat([engine(**b) for b in inputs])
        cosine = float(F.cosine_similarity(logits.flatten(0, 1), reference.flatten(0, 1), dim=-1).mean())
        metrics = ts.evaluate(engine, inputs, task="language-modeling")
        results.setdefault(name, {}).update({"cosine": cosine, "perplexity": metrics["perplexity"], "bytes": len(engine.onnx_bytes)})
        print(name, results[name], flush=True)
    prompt = {"input_ids": ids[split : split + WINDOW].reshape(1, -1), "attention_mask": torch.ones(1, WINDOW, dtype=torch.long)}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine(**prompt)  # warm up
    for _ in range(3 if options.quick else 9):
        for name, engine in engines.items():
            started = time.perf_counter()
            engine(**prompt)
            times[name].append(time.perf_counter() - started)
    fp32_ms = statistics.median(times["ONNX float32"]) * 1000
    rows = []
    for name in engines:
        r = results[name]
        ms = statistics.median(times[name]) * 1000
        r.update({"prefill_ms": ms, "speedup": fp32_ms / ms})
        rows.append([name, f"{r['cosine']:.4f}", f"{r['perplexity']:.2f}", format_bytes(r["bytes"]), f"{ms:.0f} ms", f"{fp32_ms / ms:.2f}x"])
    notes = [
        f"PyTorch float32 perplexity {base:.2f} on {sum(b['input_ids'].numel() for b in evaluation):,} tokens of Tiny Shakespeare's last 10%; "
        f"calibration on {len(starts)} windows of {WINDOW} tokens from the first 90%",
        "static int8 quantizes the products with weights (per output channel, uint8 activations per tensor); LayerNorm/RMSNorm, "
        "softmax, SiLU, the attention products and residual adds stay float, except in the 'every operator' row",
    ]
    write(
        "transformer_int8",
        "Int8 for a transformer in ONNX Runtime (SmolLM2-135M)",
        {"results": results, "pytorch_perplexity": base},
        [table(["engine", "cosine to float", "perplexity", "file", f"prefill {WINDOW} tokens", "speedup"], rows)],
        options,
        notes,
    )


if __name__ == "__main__":
    main()
