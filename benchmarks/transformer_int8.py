"""Int8 and int4 for a transformer in ONNX Runtime on a real pretrained causal LM (SmolLM2-135M-Instruct, see
``benchmarks.llm``): the float ONNX export against dynamic int8 (per tensor, per token) and static int8 (min-max,
percentile, entropy calibration; with and without SmoothQuant's migration), quantizing every operator against only
the products with weights, and weight-only int4 exported as ONNX Runtime's MatMulNBits (float activations, and its
accuracy level 4: activations rounded to int8 per block inside the kernel). For each: cosine of the logits to PyTorch
float32, perplexity, file size, prefill latency of one 256-token window and of a one-token forward (no cache: the
weight-bound step of decoding) in ONNX Runtime (2 threads, every session timed in one process, alternating, medians).

    python3 -m benchmarks.transformer_int8 [--quick] [--only "ROW,ROW"]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import torchslim as ts
from benchmarks.harness import arguments, only_rows, write
from benchmarks.llm import MODEL_DIR, WINDOW, _tokens
from torchslim.export.onnx import OnnxModule, export_onnx
from torchslim.export.verb import export
from torchslim.quantization.onnx_notes import float_products
from torchslim.report.markdown import format_bytes, table

CONFIGS: dict[str, dict[str, Any]] = {
    "dynamic int8, per tensor": {"mode": "dynamic", "per_token": False},
    "dynamic int8, per token": {"mode": "dynamic", "per_token": True},
    "dynamic int8, per token, float head": {"mode": "dynamic", "per_token": True, "float_head": True},
    "static int8, min-max, every product int8": {"float_below_db": 0},
    "static int8, min-max, outlier products float": {},
    "static int8, percentile 99.999": {"calibration": "percentile"},
    "static int8, entropy": {"calibration": "entropy"},
    "static int8, min-max, SmoothQuant 0.5, every product int8": {"smooth": 0.5, "float_below_db": 0},
    "static int8, percentile, SmoothQuant 0.5": {"calibration": "percentile", "smooth": 0.5},
    "static int8, every operator quantized (min-max)": {"weight_matmuls_only": False, "float_below_db": 0},
}


# ONNX Runtime's histogram calibrators: on this model their calibration ran for over 15 minutes without finishing
# (they capture every intermediate tensor), so a full run leaves them out; the quick run of commit c016970 measured
# percentile + SmoothQuant 0.5 at cosine 0.78 and perplexity 67.9 (float 26.3)
HISTOGRAM = {"static int8, percentile 99.999", "static int8, entropy", "static int8, percentile, SmoothQuant 0.5"}
INT4_G128 = {"bits": 4, "granularity": "group", "group_size": 128, "symmetric": False}
INT4_NAME = "weight-only int4 g128 (MatMulNBits)"
INT4_WHOLE = "weight-only int4 g128 with the embedding and tied head (+ GatherBlockQuantized)"
# the weight-only rows: which layers each quantizes (the embedding shares its codes with the tied LM head)
INT4_MIXED = "weight-only int4 g128 with the embedding and tied head int8 g128 (+ GatherBlockQuantized)"
TABLE = ("model.embed_tokens", "lm_head")
INT4_LAYERS: dict[str, dict[str, Any]] = {
    INT4_NAME: {"layers": {"types": ["Linear"]}},
    INT4_WHOLE: {"layers": {"types": ["Linear", "Embedding"]}},
    INT4_MIXED: {"layers": {"types": ["Linear", "Embedding"]}, "overrides": {name: {"bits": 8} for name in TABLE}},
}
ROWS = list(CONFIGS) + [f"{name}{level}" for name in INT4_LAYERS for level in ("", ", accuracy level 4")]


def main() -> None:
    only = only_rows(ROWS)  # these rows run (and are timed against float32) again; the others keep their last full run
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
    names = (
        [n for n in CONFIGS if n not in HISTOGRAM]
        if not options.quick
        else ["dynamic int8, per tensor", "dynamic int8, per token", "static int8, min-max, outlier products float"]
    )
    previous: dict[str, Any] = {}
    if only:
        previous = json.loads((Path(__file__).parent / "results" / "transformer_int8.json").read_text())["results"]["results"]
        names = [n for n in names if n in only]
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
            kept_float = float_products(engines[name].onnx_bytes)
            if kept_float is not None:
                results[name]["float_products"] = kept_float["products"]
            print(name, f"{results[name]['quantize_seconds']:.0f} s", flush=True)
        for index, (name, selection) in enumerate(INT4_LAYERS.items()):
            if only and not {name, name + ", accuracy level 4"} & set(only):
                continue
            started = time.perf_counter()
            int4 = ts.quantize(model, {"weights": INT4_G128, **selection}).model
            path = Path(folder) / f"int4-{index}.onnx"
            export(int4, "onnx", example, path)
            results[name] = {"quantize_seconds": time.perf_counter() - started}
            engines[name] = OnnxModule(path)
            level4 = export(int4, "onnx", example, path.with_name(f"int4-{index}-level4.onnx"), accuracy_level=4).report.stages[0].metrics
            del int4
            engines[name + ", accuracy level 4"] = OnnxModule(level4["path"])
            results[name + ", accuracy level 4"] = {**results[name], "export_relative_error": max(level4["relative_error"].values())}
    for name, engine in engines.items():
        logits = torch.cat([engine(**b) for b in inputs])
        cosine = float(F.cosine_similarity(logits.flatten(0, 1), reference.flatten(0, 1), dim=-1).mean())
        metrics = ts.evaluate(engine, inputs, task="language-modeling")
        results.setdefault(name, {}).update({"cosine": cosine, "perplexity": metrics["perplexity"], "bytes": len(engine.onnx_bytes)})
        print(name, results[name], flush=True)
    prompt = {"input_ids": ids[split : split + WINDOW].reshape(1, -1), "attention_mask": torch.ones(1, WINDOW, dtype=torch.long)}
    token = {"input_ids": prompt["input_ids"][:, :1], "attention_mask": prompt["attention_mask"][:, :1]}
    times: dict[str, list[float]] = {name: [] for name in engines}
    token_times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine(**prompt)  # warm up
        engine(**token)
    for _ in range(3 if options.quick else 9):
        for name, engine in engines.items():
            started = time.perf_counter()
            engine(**prompt)
            times[name].append(time.perf_counter() - started)
            for _ in range(5):
                started = time.perf_counter()
                engine(**token)
                token_times[name].append(time.perf_counter() - started)
    fp32_ms = statistics.median(times["ONNX float32"]) * 1000
    fp32_token_ms = statistics.median(token_times["ONNX float32"]) * 1000
    for name in engines:
        ms = statistics.median(times[name]) * 1000
        token_ms = statistics.median(token_times[name]) * 1000
        results[name].update({"prefill_ms": ms, "speedup": fp32_ms / ms, "token_ms": token_ms, "token_speedup": fp32_token_ms / token_ms})
    kept = [name for name in previous if name not in results]  # rows not run again: their numbers and timings are the last full run's
    results.update({name: previous[name] for name in kept})
    rows = []
    for name in ["ONNX float32"] + [n for n in ROWS if n in results]:
        r = results[name]
        rows.append(
            [
                name,
                f"{r['cosine']:.4f}",
                f"{r['perplexity']:.2f}",
                format_bytes(r["bytes"]),
                f"{r['prefill_ms']:.0f} ms ({r['speedup']:.2f}x)",
                f"{r['token_ms']:.1f} ms ({r['token_speedup']:.2f}x)",
            ]
        )
    notes = [
        f"PyTorch float32 perplexity {base:.2f} on {sum(b['input_ids'].numel() for b in evaluation):,} tokens of Tiny Shakespeare's last 10%; "
        f"calibration on {len(starts)} windows of {WINDOW} tokens from the first 90%",
        "static int8 quantizes the products with weights (per output channel, uint8 activations per tensor); LayerNorm/RMSNorm, "
        "softmax, SiLU, the attention products and residual adds stay float, except in the 'every operator' row",
        "'outlier products float' (quantize's default for a transformer): a product whose input tokens, rounded to the input's per-tensor "
        "static grid over the calibration windows, keep a median SQNR below 20 dB stays float; "
        + "; ".join(f"{name}: {len(r['float_products'])} such products" for name, r in results.items() if r.get("float_products")),
        "ONNX Runtime's histogram calibrators (percentile, entropy) are left out of the full run: their calibration of this model ran "
        "for over 15 minutes without finishing",
        "dynamic int8 per tensor is ONNX Runtime's quantize_dynamic (one activation scale per tensor, computed at run time); per token "
        "is torchslim's rewrite: each token's own scale (max |x| / 127, uint8 around 128) into MatMulInteger, weights per output channel",
        "int4: round-to-nearest g128 asymmetric weights (the weight-only quantize verb; GPTQ's codes export the same way), ts.export to "
        "ONNX with each product as MatMulNBits on the packed codes, checked against PyTorch; the embedding and the tied LM head stay float, "
        "except in the rows that name them: the head a MatMulNBits and the lookup a GatherBlockQuantized, reading one copy of the codes (4 or 8 bits)",
    ]
    if kept:
        notes.append(f"rows measured in an earlier full run and not run again (their speedups are against that run's float32): {', '.join(kept)}")
    write(
        "transformer_int8",
        "Int8 and int4 for a transformer in ONNX Runtime (SmolLM2-135M)",
        {"results": results, "pytorch_perplexity": base},
        [table(["engine", "cosine to float", "perplexity", "file", f"prefill {WINDOW} tokens (speedup)", "one-token forward (speedup)"], rows)],
        options,
        notes,
    )


if __name__ == "__main__":
    main()
