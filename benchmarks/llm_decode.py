"""Decode speed of weight-only int8 against fp32 on the small pretrained causal LM (SmolLM2-135M), all variants in one
process and timed in interleaved rounds, so that their ratios hold on a noisy machine: one decode step with the KV
cache (batch 1, 2 threads; the step's forward alone, and ``generate`` of 32 new tokens with Hugging Face's loop
around it), with the perplexity of each variant on Tiny Shakespeare's last 10%.

Variants: fp32; int8 per output channel (symmetric: the ``_weight_int8pack_mm`` kernel); and the same with the tied
embedding / LM head quantized too (one int8 table: the head's product on the kernel as well). Needs the model
(``python3 -m benchmarks.llm --prepare``, or TORCHSLIM_LLM_DIR) and ../shared/data."""

from __future__ import annotations

import statistics
import sys
import time

import torch

import torchslim as ts
from benchmarks.harness import arguments, write
from benchmarks.llm import EMBEDDING, MODEL_DIR, WINDOW, _tokens
from torchslim.report import markdown

INT8 = {"bits": 8, "symmetric": True, "granularity": "channel"}


def _step_ms(model, token, past, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model(token, past_key_values=past, use_cache=True)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    options = arguments(__doc__)
    if not (MODEL_DIR / "config.json").is_file():
        sys.exit(f"no model in {MODEL_DIR}: run python3 -m benchmarks.llm --prepare (or set TORCHSLIM_LLM_DIR)")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ids = _tokens(options.data_root / "text" / "tinyshakespeare.txt", tokenizer, MODEL_DIR / "shakespeare-ids.pt")
    split = int(0.9 * ids.numel())
    evaluation = ts.data.token_windows(ids, WINDOW, max_tokens=1024 if options.quick else 4096, batch_size=4, start=split)
    int8 = ts.quantize(base, {"weights": INT8}).model.eval()
    with_head = ts.quantize(int8, {"weights": INT8, "layers": EMBEDDING}).model.eval()
    models = {"fp32": base, "int8 per channel": int8, "int8 + embedding / head int8": with_head}
    results: dict = {}
    for name, model in models.items():
        results[name] = {"perplexity": ts.evaluate(model, evaluation, task="language-modeling")["perplexity"], "step_ms": [], "generate_s": []}
    prompt = ids[split : split + 64].unsqueeze(0)
    new = 32
    rounds = 2 if options.quick else 5
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():
                past = model(prompt, use_cache=True).past_key_values
                token = prompt[:, -1:]
                _step_ms(model, token, past, 3)
                results[name]["step_ms"] += _step_ms(model, token, past, 10 if options.quick else 30)
                started = time.perf_counter()
                model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                results[name]["generate_s"].append(time.perf_counter() - started)
    rows = []
    reference = statistics.median(results["fp32"]["step_ms"])
    reference_generate = statistics.median(results["fp32"]["generate_s"])
    for name, entry in results.items():
        step = statistics.median(entry["step_ms"])
        generate = statistics.median(entry["generate_s"])
        entry.update(step_median_ms=step, decode_tokens_per_s=1000 / step, generate_tokens_per_s=new / generate)
        rows.append(
            [
                name,
                f"{entry['perplexity']:.2f}",
                f"{step:.1f} ms",
                f"{1000 / step:.1f}",
                f"{reference / step:.2f}x",
                f"{new / generate:.1f}",
                f"{reference_generate / generate:.2f}x",
            ]
        )
        entry.pop("step_ms")
    table = markdown.table(["variant", "perplexity", "decode step (median)", "tokens/s", "vs fp32", "generate tokens/s", "vs fp32"], rows)
    notes = [
        f"One decode step: the model's forward on one new token with a 64-token KV cache, median of {rounds} interleaved rounds x "
        f"{10 if options.quick else 30} steps; generate: {new} new tokens after the 64-token prompt (greedy), prefill included, median of {rounds} rounds.",
        "Perplexity over Tiny Shakespeare's last 10% in windows of 256 (a shorter budget than benchmarks.llm's table).",
        "The int8 layers run aten._weight_int8pack_mm (bfloat16 activations, int8 weights, per-channel scales); "
        "the fp32 LM head alone is a 49,152 x 576 product, several milliseconds per token here.",
    ]
    write("llm_decode", "Weight-only int8 decode against fp32 (SmolLM2-135M, one process)", results, [table], options, notes)


if __name__ == "__main__":
    main()
