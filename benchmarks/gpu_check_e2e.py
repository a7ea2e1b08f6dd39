"""gpu_check.py section c, `e2e`: Medusa decoding on a SmolLM2-135M-shaped random Llama, token ids vs generate()
in fp32 and bf16 at batch 1 and 8, and tokens/s of Medusa vs base greedy."""

from __future__ import annotations

import functools
import inspect
import time

from gpu_check_run import Run, Sizes, dtypes

# Random weights with the checkpoint's std (0.02) decode one token over and over; 0.1 gives varied greedy text and
# logit gaps like a trained model's (median top-2 gap ~0.35), so exactness and acceptance mean something.
RANDOM_INIT_STD = 0.1


def build_base(sizes: Sizes, device):
    """The random Llama of `sizes.model` (SmolLM2-135M-shaped on the GPU), frozen, SDPA attention, on `device`."""
    from medusa_toolkit.testing.tiny import tiny_base

    return tiny_base("llama", seed=0, initializer_range=RANDOM_INIT_STD, **sizes.model).to(device)


def generate_batch(model, input_ids, attention_mask, max_new_tokens: int, **kw):
    """Batched Medusa decoding through the public API: `medusa_generate_batch` where the toolkit exports it, else
    `medusa_generate` with an attention mask (which took batches before the decoding API was split)."""
    import medusa_toolkit

    if hasattr(medusa_toolkit, "medusa_generate_batch"):
        return medusa_toolkit.medusa_generate_batch(model, input_ids, attention_mask, max_new_tokens, **kw)
    if attention_mask is None:
        attention_mask = input_ids.new_ones(input_ids.shape)
    return medusa_toolkit.medusa_generate(model, input_ids, max_new_tokens, attention_mask=attention_mask, **kw)


def classify(base, ref_row, got_row, prompt_len: int, dtype_name: str) -> dict:
    """exact, or the first divergence: a tie when the reference's logits there are within the tie tolerance (the
    verifier's own rule and per-dtype defaults, from the reference's logits recomputed for the prefix)."""
    import torch

    from medusa_toolkit.verify.verifier import classify_divergence, default_tie_tolerance, first_divergence

    ref, got = ref_row.tolist(), got_row.tolist()
    i = first_divergence(ref, got)
    if i is None:
        return {"result": "exact"}
    if i >= min(len(ref), len(got)):
        return {"result": "mismatch", "position": i - prompt_len, "why": "different lengths"}
    with torch.no_grad():
        prefix = torch.tensor([ref[:i]], device=next(base.parameters()).device)
        logits = base(prefix, attention_mask=torch.ones_like(prefix)).logits[0, -1]
    kind, _, gap = classify_divergence(logits, ref[i], got[i], default_tie_tolerance(dtype_name))
    return {"result": kind, "position": i - prompt_len, "ref_token": ref[i], "got_token": got[i], "logit_gap": gap}


def exact_prompts(corpus, sizes: Sizes, vocab: int) -> list:
    """Prefixes of the heads' training text (long accepted paths) and random prompts (mostly rejected)."""
    import torch

    g = torch.Generator().manual_seed(7)
    half = sizes.exact_prompts // 2
    prompts = [corpus[i, : 5 + 3 * i].cpu() for i in range(half)]
    prompts += [
        torch.randint(3, vocab, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g)
        for _ in range(sizes.exact_prompts - half)
    ]
    return prompts


def section_e2e(run: Run, deadline: float, device, sizes: Sizes) -> dict:
    import torch
    from transformers import LlamaModel

    from medusa_toolkit import MedusaModel, MedusaTree, medusa_generate
    from medusa_toolkit.testing.heads import fit_heads_on, greedy_corpus

    if "cache" not in inspect.signature(LlamaModel.forward).parameters:
        import transformers

        return {
            "status": "skipped",
            "reason": f"transformers {transformers.__version__} has no `cache=` forward argument, which the toolkit's "
            "decoding uses (it has `past_key_values`): carry the .venv's transformers wheel (make gpu-wheels)",
        }
    t0 = time.perf_counter()
    base = build_base(sizes, device)
    n, plen, new = sizes.corpus
    corpus = greedy_corpus(base, n, plen, new, seed=0, low=3)  # ids 0-2 are SmolLM2's special tokens
    fit = fit_heads_on(base, corpus, num_heads=4, steps=sizes.fit_steps, deadline=t0 + 0.2 * (deadline - t0))
    heads, fit_steps, top1 = fit.heads, fit.steps, fit.top1
    run.log(
        f"   base {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params; heads fitted {fit_steps} steps, top-1 {[round(x, 2) for x in top1]}"
    )
    mc = MedusaTree.preset("mc_sim_7b_63")
    trees = {
        name: (MedusaTree.from_paths(mc.paths[:15], name=name) if name == "mc_sim-16" else MedusaTree.resolve(name, 4))
        for name in sizes.trees
    }
    exact_tree = trees[sizes.trees[-1]]
    prompts = exact_prompts(corpus, sizes, base.config.vocab_size)
    N = sizes.exact_new_tokens
    result = {"fit_steps": fit_steps, "heads_top1": top1, "exactness": {}, "speed": {}}
    for dtype_name in ("float32", "bfloat16"):
        if time.perf_counter() > deadline:
            break
        base.to(dtypes()[dtype_name])
        model = MedusaModel(base, heads)
        refs, counts = [], {"exact": 0, "tie": 0, "mismatch": 0}
        details = []
        with torch.no_grad():
            for p in prompts:
                ids = p[None].to(device)
                refs.append(
                    base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N)[0]
                )
        accept = []
        for b, p in enumerate(prompts):  # batch 1
            out = medusa_generate(
                model, p[None].to(device), N, tree=exact_tree, attn_implementation="medusa_flash_decoding"
            )
            c = classify(base, refs[b], out.sequences[0], len(p), dtype_name)
            counts[c["result"]] += 1
            accept.append(out.mean_accept_length)
            if c["result"] != "exact":
                details.append({"batch": 1, "prompt": b, **c})
        batch_counts = {"exact": 0, "tie": 0, "mismatch": 0}
        width = max(len(p) for p in prompts)  # batch 8: left-padded prompts of different lengths
        pad = base.config.pad_token_id
        ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts]).to(device)
        mask = (
            torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts])
            .long()
            .to(device)
        )
        out = generate_batch(model, ids, mask, N, tree=exact_tree, attn_implementation="medusa_flash_decoding")
        for b, row in enumerate(out.rows()):
            c = classify(base, refs[b], row, len(prompts[b]), dtype_name)
            batch_counts[c["result"]] += 1
            if c["result"] != "exact":
                details.append({"batch": len(prompts), "prompt": b, **c})
        result["exactness"][dtype_name] = {
            "tree": exact_tree.name, "nodes": exact_tree.num_nodes, "new_tokens": N,
            "batch1": counts, f"batch{len(prompts)}": batch_counts,
            "mean_accept_length_batch1": round(sum(accept) / len(accept), 2), "divergences": details,
        }  # fmt: skip
        run.log(
            f"   {dtype_name}: batch 1 {counts}, batch {len(prompts)} {batch_counts}, accept {sum(accept) / len(accept):.2f}"
        )
        if dtype_name == "bfloat16":  # the GPU serving dtype; fp32 is for exactness
            result["speed"][dtype_name] = speed_e2e(run, deadline, device, base, model, trees, corpus, sizes)
        run.save()
    fp32, bf16 = result["exactness"].get("float32"), result["exactness"].get("bfloat16")
    ok = fp32 is not None and all(
        fp32[k]["mismatch"] == 0 and fp32[k]["tie"] == 0 for k in fp32 if k.startswith("batch")
    )
    ok = ok and bf16 is not None and all(bf16[k]["mismatch"] == 0 for k in bf16 if k.startswith("batch"))
    result["status"] = "ok" if ok else "fail"
    return result


def speed_e2e(run: Run, deadline: float, device, base, model, trees: dict, corpus, sizes: Sizes) -> dict:
    """Tokens/s of base greedy generate() vs medusa_generate per tree, batch 1 (corpus prompt and random prompt)
    and batch 8, exactly N new tokens each (no early EOS)."""
    import torch

    from medusa_toolkit import medusa_generate
    from medusa_toolkit.tuning.timing import sync

    N = sizes.speed_new_tokens
    rows = []
    g = torch.Generator().manual_seed(9)
    prompts = {
        "corpus": corpus[0:1, :12],
        "random": torch.randint(3, base.config.vocab_size, (1, 12), generator=g).to(device),
        "batch": corpus[: min(8, corpus.shape[0]), :12],
    }

    def greedy(ids, n):
        return base.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
            pad_token_id=base.config.pad_token_id,
        )  # fmt: skip

    def medusa(ids, tree, n):
        if ids.shape[0] > 1:
            return generate_batch(
                model, ids, None, n, tree=tree, eos_token_id=[], attn_implementation="medusa_flash_decoding"
            )
        return medusa_generate(model, ids, n, tree=tree, eos_token_id=[], attn_implementation="medusa_flash_decoding")

    def timed(fn):
        fn(8)  # a short warm-up (allocator, library handles; the kernels are compiled already)
        sync(device)
        t = time.perf_counter()
        out = fn(N)
        sync(device)
        return time.perf_counter() - t, out

    with torch.no_grad():
        for label, ids in prompts.items():
            t_base, _ = timed(functools.partial(greedy, ids))
            base_tps = ids.shape[0] * N / t_base
            rows.append(
                {"prompt": label, "batch": ids.shape[0], "decoder": "base_greedy", "tokens_per_s": round(base_tps, 1)}
            )
            for name, tree in trees.items():
                if time.perf_counter() > deadline:
                    break
                t, out = timed(functools.partial(medusa, ids, tree))
                tps = ids.shape[0] * N / t
                rows.append({
                    "prompt": label, "batch": ids.shape[0], "decoder": name, "nodes": tree.num_nodes,
                    "accept_length": round(out.mean_accept_length, 2), "tokens_per_s": round(tps, 1),
                    "x_base": round(tps / base_tps, 2),
                })  # fmt: skip
            done = ", ".join(f"{r['decoder']} {r['tokens_per_s']}" for r in rows if r["prompt"] == label)
            run.log(f"   {done} tok/s ({label}, batch {ids.shape[0]})")
    return {"new_tokens": N, "rows": rows}
