"""gpu_check.py section `step`: the decoding step eager vs compiled (decoding.compiled, `model.compile: on`) per tree
size, on a SmolLM2-135M-shaped random Llama with fresh heads: the GPU's column of benchmarks/bench_roofline.py.

Step times are measured as the tree tuner measures them (tuning.timing.measure_step_times: KV length 256, the
profile trees it tunes from), eager and compiled alternating in two halves so that a load that comes and goes hits
both alike; ratios are to the compiled one-token step. The CPU dry run times the eager step twice (compiling even a
tiny model costs a minute on two cores; tests/decoding/test_compiled.py checks the compiled path itself).
"""

from __future__ import annotations

import inspect
import statistics

from gpu_check_e2e import build_base
from gpu_check_run import Run, Sizes, dtypes


def section_step(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    import time

    from transformers import LlamaModel

    from medusa_toolkit import MedusaHeads, MedusaModel
    from medusa_toolkit.decoding import compiled
    from medusa_toolkit.tuning.timing import measure_step_times, profile_trees

    if "cache" not in inspect.signature(LlamaModel.forward).parameters:
        return {"status": "skipped", "reason": "transformers without the `cache=` forward argument (make gpu-wheels)"}
    base = build_base(sizes, device).to(dtypes()[sizes.step_dtype])
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 4).to(device, base.dtype)
    heads.init_from_lm_head(base.get_output_embeddings().weight)
    model = MedusaModel(base, heads).eval()
    eager = (model.step, model.medusa_logits)
    t0 = time.perf_counter()
    if sizes.step_compile:
        compiled.compile_decoding(model, "on", "sdpa", log=run.log)
        compiled.warm_up(model, sizes.step_tree_sizes, log=run.log)
    fns = {"eager": eager, "compiled": (model.step_fn, model.heads_fn)}
    compile_s = round(time.perf_counter() - t0, 1)
    trees = profile_trees(model.num_heads, list(sizes.step_tree_sizes))
    samples: dict[str, dict[int, list[float]]] = {"eager": {}, "compiled": {}}
    for name in ("eager", "compiled", "eager", "compiled"):
        if time.perf_counter() > deadline:
            break
        model.step_fn, model.heads_fn = fns[name]
        times = measure_step_times(model, trees, 256, 1, "sdpa", sizes.step_repeats, progress=False)
        for n, seconds in times.median.items():
            samples[name].setdefault(n, []).append(1e3 * seconds)
    ms = {name: {n: statistics.mean(v) for n, v in per.items()} for name, per in samples.items()}
    if not ms["compiled"]:
        return {"status": "fail", "reason": "no compiled step timed before the deadline", "compile_s": compile_s}
    one = ms["compiled"][min(ms["compiled"])]
    rows = [{"nodes": n, "eager_ms": round(ms["eager"][n], 3), "compiled_ms": round(ms["compiled"][n], 3),
             "x_eager": round(ms["eager"][n] / ms["compiled"][n], 2), "x_one_node": round(ms["compiled"][n] / one, 2)}
            for n in sorted(ms["compiled"]) if n in ms["eager"]]  # fmt: skip
    for r in rows:
        run.log(f"   {r['nodes']:>3} nodes: eager {r['eager_ms']:.2f} ms, compiled {r['compiled_ms']:.2f} ms "
                f"({r['x_eager']}x faster, {r['x_one_node']}x one node)")  # fmt: skip
    return {"dtype": sizes.step_dtype, "compiled": model.compiled, "compile_s": compile_s, "rows": rows}
