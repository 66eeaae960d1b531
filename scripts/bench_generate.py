"""Sampling speed: prefill and decode of the paper's model per pattern, and one decode step's attention.

    python scripts/bench_generate.py --out benchmarks/generate-h100          # needs a CUDA GPU
    python scripts/bench_generate.py --device cpu --contexts 256 --batches 1 --n-layer 1 --d-model 64 \
        --stride 32 --c 16 --blocksize 16 --tokens 3 --million 0 --no-flex --out /tmp/bg   # CPU smoke

Two tables, written to ``--out`` (JSON and markdown) after every row:

* **attention**: one layer's attention for one new token per sequence at context ``n`` (8 heads,
  head_dim 64, ``--dtype``), the cache full of random keys: PyTorch SDPA over the whole cache
  (dense), ours (the decode kernel, every pattern, the full cache and the bounded one) and
  FlexAttention decoding the same pattern (a one-token query with the pattern's block mask). GPU
  time of a CUDA-graph replay and host time of an eager call, cache bytes per layer; 1,048,576
  tokens (``--million``) for ``local``, ``strided``, ``fixed`` at batch 1.
* **model**: the Sparse Transformer (``--n-layer`` blocks, ``--d-model``, 8 heads, weights in
  ``--dtype``) per paper pattern: prefill time of a ``n - tokens`` prompt (and the training
  forward at ``n`` for the ratio), milliseconds per token decoding eagerly through the static
  cache, replaying one captured decode step (``decode_graph``), and through the growing cache of
  before (``n <= 16384``); tokens per second, cache bytes per layer (full and bounded), peak memory.
  The dense model is the ``dense`` pattern through the same cache and kernel (``all``).
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_attention.models import SparseTransformer, SparseTransformerConfig
from sparse_attention.patterns import Mode, paper_preset
from sparse_attention.utils.benchmark import (
    add_device_arg,
    add_dtype_arg,
    add_model_args,
    call_ms,
    comma_list,
    environment,
    graph_ms,
    host_us,
    is_cuda,
    script_parser,
    synchronize,
    timeit,
    torch_dtype,
)


def attention_modes(a) -> dict:
    return {
        "all": Mode("all"),
        "local": Mode("local", a.stride),
        "strided": Mode("strided", a.stride),
        "fixed": Mode("fixed", a.stride, num_verts=1, vertsize=a.c // a.blocksize),
    }


def _gpu_ms(fn, device) -> float:
    return graph_ms(fn) if is_cuda(device) else timeit(fn, budget_s=0.2, device=device)


def attention_rows(a, device, dtype):
    from sparse_attention.torch.decode import CacheLayer

    H, D = 8, 64
    cases = [(n, b) for n in a.contexts for b in a.batches]
    if a.million:
        cases.append((1 << 20, 1))
    for n, B in cases:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=g)
        kfull = torch.randn(B, H, n, D, device=device, dtype=dtype, generator=g)
        vfull = torch.randn_like(kfull)
        row = {"n": n, "batch": B}
        if n < (1 << 20):
            row["sdpa:dense"] = _time(partial(F.scaled_dot_product_attention, q, kfull, vfull), device)
        for name, spec in attention_modes(a).items():
            if n == 1 << 20 and name == "all":
                continue
            for bounded in (False, True):
                if bounded and name in ("all", "strided"):
                    continue
                layer = CacheLayer(spec, H, D, a.blocksize, B, n, dtype, device, bounded, 1)
                lengths = torch.full((B,), n - 1, device=device, dtype=torch.int64)
                _fill(layer, kfull, vfull, B, n)
                key = f"ours:{name}" + (":bounded" if bounded else "")
                row[key] = _time(partial(layer.attend, q, lengths), device)
                row[key]["cache_mib"] = round(layer.nbytes() / 2**20, 2)
            if a.flex:
                row[f"flex:{name}"] = _flex(q, kfull, vfull, spec, a, n, device)
        yield row


def _fill(layer, kfull, vfull, B, n):
    """Every slot of a cache layer at its position's keys (a prefill's result, without the model)."""
    chunk = 1 << 16
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        lengths = torch.full((B,), s, device=kfull.device, dtype=torch.int64)
        layer.write(kfull[:, :, s:e], vfull[:, :, s:e], lengths, torch.full_like(lengths, n))


def _time(fn, device) -> dict:
    try:
        fn()
        synchronize(device)
        try:
            out = {"gpu_us": round(_gpu_ms(fn, device) * 1e3, 1)}
        except RuntimeError as e:
            # e.g. compiled FlexAttention copying from the host inside a capture: CUDA events
            # around an eager call instead (host time included where it exceeds the GPU's)
            out = {"event_us": round(timeit(fn, budget_s=0.2, device=device) * 1e3, 1), "no_graph": str(e)[:120]}
        out["host_us"] = round(host_us(fn, 50, device), 1)
        return out
    except Exception as e:  # noqa: BLE001 - a failed variant is reported, the rest still run
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def _flex(q, k, v, spec, a, n, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return {"error": str(e)}
    try:
        pos = n - 1

        def mask_mod(b, h, qi, kv):
            return spec.allowed(qi + pos, kv, h, q.shape[1], a.blocksize)

        bm = create_block_mask(mask_mod, None, None, 1, n, device=device)
        fa = torch.compile(flex_attention, dynamic=False)
        return _time(lambda: fa(q, k, v, block_mask=bm), device)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def model_rows(a, device, dtype):
    for pattern in a.patterns:
        specs = paper_preset(pattern, a.stride, a.c, a.blocksize)
        for n in a.contexts:
            for B in a.batches:
                if B > 1 and n > a.max_batched_context:
                    continue
                yield _model_row(a, device, dtype, pattern, specs, n, B)
        if a.model_million and pattern != "dense":
            yield _model_row(a, device, dtype, pattern, specs, 1 << 20, 1)


def _once_or_median(fn, n, device) -> float:
    """Milliseconds of ``fn``: the median of a few calls, or one call after a warm-up at 1M tokens."""
    if n >= 1 << 20:
        fn()
        return call_ms(fn, 1, device)[0]
    return timeit(fn, budget_s=0.5, max_reps=3, device=device)


def _model_row(a, device, dtype, pattern, specs, n, B):
    torch.manual_seed(0)
    cfg = SparseTransformerConfig(
        n_ctx=n,
        d_model=a.d_model,
        n_head=8,
        n_kv_head=a.n_kv_head,
        n_layer=a.n_layer,
        patterns=specs,
        blocksize=a.blocksize,
    )
    model = SparseTransformer(cfg).to(device=device, dtype=dtype).eval()
    t0 = n - a.tokens
    prompt = torch.randint(0, 256, (B, t0), device=device)
    row = {"pattern": pattern, "n": n, "batch": B}
    try:
        with torch.no_grad():
            x = torch.randint(0, 256, (B, n), device=device)
            row["forward_ms"] = round(_once_or_median(partial(model, x), n, device), 2)
            del x
            for bounded in (False, True):
                tag = "bounded_" if bounded else ""
                cache = model.new_static_cache(B, bounded=bounded)
                row[f"{tag}cache_mib_per_layer"] = round(max(cache.nbytes()) / 2**20, 2)
                row[f"{tag}cache_mib"] = round(sum(cache.nbytes()) / 2**20, 2)
                if is_cuda(device):
                    torch.cuda.reset_peak_memory_stats(device)
                row[f"{tag}prefill_ms"] = round(_once_or_median(partial(model.prefill, prompt, cache), n, device), 2)
                if is_cuda(device):
                    row[f"{tag}peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
                tok = torch.randint(0, 256, (B, 1), device=device)
                row[f"{tag}eager_ms_per_token"] = _per_token(partial(model, tok, cache=cache), cache, a, device)
                if is_cuda(device):
                    step = model.decode_graph(cache)
                    row[f"{tag}graph_ms_per_token"] = _per_token(partial(step, tok), cache, a, device)
            if n <= 16384:
                row["growing_cache_ms_per_token"] = _growing(model, prompt, a, device)
        for k in ("eager", "graph"):
            ms = row.get(f"{k}_ms_per_token")
            if ms:
                row[f"{k}_tokens_per_s"] = round(B * 1e3 / ms)
        if row.get("prefill_ms"):
            row["prefill_over_forward"] = round(row["prefill_ms"] / row["forward_ms"] * n / t0, 2)
    except Exception as e:  # noqa: BLE001 - a failed variant is reported, the rest still run
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if is_cuda(device):
        torch.cuda.empty_cache()
    return row


def _per_token(step, cache, a, device) -> float:
    """Median milliseconds of a decode step over ``a.tokens`` steps after the prompt (the cache's
    lengths put back before each run)."""
    saved = cache.lengths.clone()
    times = []
    for _ in range(3):
        cache.lengths.copy_(saved)
        synchronize(device)
        t = time.perf_counter()
        for _ in range(a.tokens):
            step()
        synchronize(device)
        times.append((time.perf_counter() - t) * 1e3 / a.tokens)
    cache.lengths.copy_(saved)
    return round(sorted(times)[1], 3)


def _growing(model, prompt, a, device) -> float:
    cache = model.new_cache()
    model(prompt, cache=cache)
    tok = prompt[:, -1:]
    n = min(a.tokens, 16)
    synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        model(tok, cache=cache)
    synchronize(device)
    return round((time.perf_counter() - t) * 1e3 / n, 3)


def markdown(env, att, mod) -> str:
    out = [f"# Generation ({env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']})", ""]
    out += [f"`{env['command']}` at commit `{env['commit']}`", "", "## One decode step's attention (us)", ""]
    keys = sorted({k for r in att for k in r if ":" in k}, key=lambda k: (k.split(":")[1], k))
    out += ["| n | batch | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in att:
        cells = []
        for k in keys:
            v = r.get(k)
            if v is None:
                cells.append("")
            elif "error" in v:
                cells.append("failed")
            else:
                mib = f", {v['cache_mib']} MiB" if "cache_mib" in v else ""
                gpu = f"{v['gpu_us']} gpu" if "gpu_us" in v else f"{v['event_us']} events"
                cells.append(f"{gpu} / {v['host_us']} host{mib}")
        out.append(f"| {r['n']} | {r['batch']} | " + " | ".join(cells) + " |")
    out += ["", "## Model: prefill and decode", ""]
    cols = [
        "forward_ms", "prefill_ms", "prefill_over_forward", "eager_ms_per_token", "graph_ms_per_token",
        "graph_tokens_per_s", "growing_cache_ms_per_token", "bounded_graph_ms_per_token",
        "cache_mib_per_layer", "bounded_cache_mib_per_layer", "peak_mib",
    ]  # fmt: skip
    out += ["| pattern | n | batch | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for r in mod:
        cells = [str(r.get(c, r.get("error", "")[:40] if c == cols[0] else "")) for c in cols]
        out.append(f"| {r['pattern']} | {r['n']} | {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = script_parser(__doc__)
    add_device_arg(p)
    add_dtype_arg(p, default="bf16")
    p.add_argument("--contexts", type=comma_list(int), default=[4096, 16384, 65536])
    p.add_argument("--batches", type=comma_list(int), default=[1, 32])
    p.add_argument("--max-batched-context", type=int, default=16384, help="model rows with batch > 1 up to this n")
    p.add_argument("--million", type=int, default=1, help="1: attention rows at 1,048,576 tokens too")
    p.add_argument("--model-million", type=int, default=0, help="1: model rows at 1,048,576 tokens (batch 1)")
    p.add_argument("--patterns", type=comma_list(str), default=["dense", "local", "fixed", "strided-interleaved"])
    add_model_args(p, n_layer=4, d_model=512, stride=128, c=32, blocksize=32)
    p.add_argument(
        "--n-kv-head", type=int, default=None, help="model rows: key/value heads of the 8 (grouped-query attention)"
    )
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed per row")
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--skip", type=comma_list(str), default=[], help="attention and/or model")
    p.add_argument("--budget", type=float, default=1e9, help="seconds: no new row of a table starts after it")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch_dtype(a.dtype)
    env = environment(device, argv, "scripts/bench_generate.py")
    a.out.mkdir(parents=True, exist_ok=True)
    att, mod = [], []

    def save():
        (a.out / "generate.json").write_text(json.dumps({"env": env, "attention": att, "model": mod}, indent=1))
        (a.out / "generate.md").write_text(markdown(env, att, mod))

    start = time.perf_counter()
    for part, rows, out in (("attention", attention_rows, att), ("model", model_rows, mod)):
        if part in a.skip:
            continue
        for row in rows(a, device, dtype):
            out.append(row)
            print(json.dumps(row), flush=True)
            save()
            if time.perf_counter() - start > a.budget:
                print(f"budget of {a.budget} s spent: no new {part} rows", flush=True)
                break
    save()
    print(markdown(env, att, mod))


if __name__ == "__main__":
    main()
