"""The paper's model: embedding, resblock, init, factorisations, recompute, mixed precision, sampling."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sparse_attention import from_dense  # noqa: E402
from sparse_attention.models import (  # noqa: E402
    Custom,
    Mode,
    SparseTransformer,
    SparseTransformerConfig,
    paper_patterns,
)
from sparse_attention.models.sparse_transformer import GELU, FactorisedEmbedding  # noqa: E402


def _random_causal_mask(T, H):
    """A per-head random causal pattern with the diagonal (no empty rows), as a dense mask."""
    g = np.random.default_rng(0)
    return np.tril(g.random((H, T, T)) < 0.3) | np.eye(T, dtype=bool)[None]


FACTORISATIONS = {
    "dense": paper_patterns("dense"),
    "fixed-merged": paper_patterns("fixed", "merged", stride=32, c=16, blocksize=16),
    "fixed-interleaved": paper_patterns("fixed", "interleaved", stride=32, c=16, blocksize=16),
    "strided-interleaved": paper_patterns("strided", "interleaved", stride=16, blocksize=16),
    "strided-merged": paper_patterns("strided", "merged", stride=16, blocksize=16),
    "strided-heads": paper_patterns("strided", "heads", stride=16, blocksize=16),
    "per-block-ratio": [Mode("local", 32), Mode("local", 32), Mode("strided", 16)],
    "custom-layout": [Custom(from_dense(_random_causal_mask(96, 2), 16))],
}


def _model(patterns, n_ctx=96, n_layer=3, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SparseTransformerConfig(
        n_ctx=n_ctx, d_model=32, n_head=2, n_layer=n_layer, patterns=patterns, blocksize=16, **kw
    )
    return SparseTransformer(cfg)


def _check_stepwise(model, x, t0, step, cache, around_prefill=None):
    """Logits of a prefill of ``t0`` tokens then chunks of ``step`` through ``cache`` equal one
    full pass (``around_prefill(run)``: runs the prefill, e.g. under a patch)."""
    with torch.no_grad():
        full, _ = model(x)
        prefill = lambda: model(x[:, :t0], cache=cache)[0]  # noqa: E731
        steps = [around_prefill(prefill) if around_prefill else prefill()]
        for t in range(t0, x.shape[1], step):
            steps.append(model(x[:, t : t + step], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    assert cache.length == x.shape[1]


@pytest.mark.parametrize("name", list(FACTORISATIONS))
def test_sampling_with_kv_cache_equals_full_forward(name):
    """Logits of a prefill plus token-by-token steps through the cache equal one full pass."""
    model = _model(FACTORISATIONS[name]).double().eval()
    x = torch.randint(0, 256, (2, 75), generator=torch.Generator().manual_seed(1))
    _check_stepwise(model, x, 20, 1, model.new_cache())


@pytest.mark.parametrize("name", [n for n in FACTORISATIONS if n != "custom-layout"])
@pytest.mark.parametrize("t0", [1, 37, 64])
def test_prefill_runs_block_sparse(name, t0, monkeypatch):
    """A prompt at the start of the cache goes through the block-sparse forward (padded inside to
    a length the pattern runs at): no masked attention over scores, and the logits of the whole
    prompt plus the next steps equal one full pass."""
    from sparse_attention.torch import nn as snn

    model = _model(FACTORISATIONS[name]).double().eval()
    x = torch.randint(0, 256, (2, t0 + 3), generator=torch.Generator().manual_seed(2))

    def refuse(*a, **k):
        raise AssertionError("prefill took the masked (dense-scores) path")

    def without_masked_attention(run):
        with monkeypatch.context() as m:
            m.setattr(snn, "masked_attention", refuse)
            return run()

    _check_stepwise(model, x, t0, 1, model.new_cache(), around_prefill=without_masked_attention)


@pytest.mark.parametrize("t0", [5, 20, 40])
def test_bounded_cache_keeps_a_window_and_equals_the_full_pass(t0):
    """``local`` layers (window 32) of a bounded cache keep the 31 positions the next token reads
    besides itself; with prompts shorter and longer than the window, every step's logits still
    equal the full pass, while the strided layer keeps everything."""
    model = _model(FACTORISATIONS["per-block-ratio"]).double().eval()
    x = torch.randint(0, 256, (2, 75), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(bounded=True)
    _check_stepwise(model, x, t0, 3, cache)
    kept = [k.shape[2] for k in cache.k]
    assert kept[0] == kept[1] == 31 and kept[2] >= 75
    assert cache.pos[0].tolist() == list(range(75 - 31, 75))
    unbounded = model.new_cache()
    with torch.no_grad():
        model(x, cache=unbounded)
    assert cache.nbytes()[0] < unbounded.nbytes()[0]
    a = model.generate(x[:, :10], 40, generator=torch.Generator().manual_seed(0), bounded_cache=True)
    b = model.generate(x[:, :10], 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("t0", [5, 40])
def test_bounded_cache_of_fixed_keeps_group_and_summaries(t0):
    """``fixed`` layers of a bounded cache keep their current group and the summary blocks only;
    the logits of every step still equal the full pass."""
    model = _model([Mode("fixed", 32, num_verts=2, vertsize=1)]).double().eval()
    x = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(bounded=True)
    _check_stepwise(model, x, t0, 4, cache)
    kept = sorted(cache.pos[0].tolist())
    # groups of 32 tokens, blocks of 16: both blocks of each earlier group are some head's
    # summary (num_verts=2), so groups 0 and 1 stay whole, plus group 2 (64..89) up to now
    assert kept == list(range(90))
    model = _model([Mode("fixed", 64, num_verts=1, vertsize=1)], n_ctx=192).double().eval()
    x = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(bounded=True)
    _check_stepwise(model, x, t0, 7, cache)
    # groups of 64: the last block (48..63, 112..127) of each earlier group, and group 2 so far
    assert sorted(cache.pos[0].tolist()) == list(range(48, 64)) + list(range(112, 150))


def test_blocks_cycle_through_patterns():
    model = _model(FACTORISATIONS["per-block-ratio"], n_layer=5)
    specs = [blk.attn.attn.spec for blk in model.blocks]
    assert specs == [Mode("local", 32), Mode("local", 32), Mode("strided", 16), Mode("local", 32), Mode("local", 32)]


def test_generate_is_reproducible_and_extends_the_prompt():
    model = _model(FACTORISATIONS["fixed-merged"])
    prompt = torch.randint(0, 256, (2, 7))
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(3), prefill_chunk=4)
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 19) and torch.equal(a[:, :7], prompt) and torch.equal(a, b)
    assert model.training  # restored
    with pytest.raises(ValueError, match="n_ctx"):
        model.generate(prompt, 90)


def test_padding_is_invisible_to_earlier_positions():
    model = _model(FACTORISATIONS["strided-merged"]).double().eval()
    x = torch.randint(0, 256, (1, 96))
    with torch.no_grad():
        long, _ = model(x)
        short, _ = model(x[:, :50])  # padded to 64 internally
    torch.testing.assert_close(short, long[:, :50], rtol=1e-10, atol=1e-10)


def test_factorised_position_embedding():
    model = _model(FACTORISATIONS["dense"], n_ctx=64, pos_shape=(4, 4, 4))
    emb = model.embed
    idx = torch.randint(0, 256, (1, 64))
    pos = torch.arange(64)
    want = (
        emb.tok(idx)[0] + emb.pos[0].weight[pos // 16] + emb.pos[1].weight[(pos // 4) % 4] + emb.pos[2].weight[pos % 4]
    )
    torch.testing.assert_close(emb(idx, pos)[0], want)
    cfg = SparseTransformerConfig(n_ctx=12288, d_model=16, n_head=2, n_layer=1)
    assert cfg.pos_shape == (96, 128)  # rows x columns for text


@pytest.mark.parametrize(
    "pos_shape, T", [((4, 4, 4), 64), ((4, 4, 4), 32), ((6, 16), 80), ((6, 16), 72), ((2, 16), 64), ((4, 4, 4), 96)]
)
def test_position_embeddings_on_the_grid_equal_the_gather(pos_shape, T):
    """From position 0 over whole rows of the grid the position embeddings are broadcast, not
    gathered: the same output and the same gradients of every embedding table (float64); other
    lengths and starts gather, and positions past the grid wrap around it (padding)."""
    emb = FactorisedEmbedding(256, 8, pos_shape, std=1.0).double()
    idx = torch.randint(0, 256, (2, T))
    g = torch.randn(2, T, emb.tok.weight.shape[1], dtype=torch.float64)
    outs = []
    for positions in (torch.arange(T), 0):
        emb.zero_grad(set_to_none=True)
        out = emb(idx, positions)
        out.backward(g)
        outs.append([out.detach(), *(p.grad.clone() for p in emb.parameters())])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(emb(idx[:, :8], 5), emb(idx[:, :8], torch.arange(5, 13)))


def test_resblock_formula_and_gelu():
    model = _model(FACTORISATIONS["fixed-merged"], n_layer=2).double()
    blk = model.blocks[0]
    h = torch.randn(2, 64, 32, dtype=torch.float64)
    a = blk.attn(blk.norm1(h))
    lin1, lin2 = blk.ff[0], blk.ff[2]
    u = lin1(blk.norm2(h + a))
    b = lin2(u * torch.sigmoid(1.702 * u))
    torch.testing.assert_close(blk(h), h + a + b)
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(GELU()(x), x / (1 + torch.exp(-1.702 * x)))


def test_output_projections_scaled_by_inverse_sqrt_2n():
    n_layer = 8
    cfg = SparseTransformerConfig(n_ctx=64, d_model=128, n_head=2, n_layer=n_layer, d_ff=512)
    torch.manual_seed(0)
    model = SparseTransformer(cfg)
    blk = model.blocks[0]
    want = cfg.init_std / math.sqrt(2 * n_layer)
    for w in (blk.attn.proj.weight, blk.ff[2].weight):
        assert abs(w.std().item() / want - 1) < 0.05
    assert abs(blk.attn.qkv.weight.std().item() / cfg.init_std - 1) < 0.05


def test_per_block_recompute_gives_equal_gradients():
    x = torch.randint(0, 256, (2, 64))
    grads = []
    for recompute in (False, True):
        model = _model(FACTORISATIONS["strided-heads"], n_ctx=64, recompute=recompute, dropout=0.1).double()
        torch.manual_seed(5)  # same dropout masks; checkpoint replays the RNG state
        _, loss = model(x, x)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_autocast(dtype):
    model = _model(FACTORISATIONS["fixed-merged"], n_ctx=64)
    x = torch.randint(0, 256, (2, 64))
    _, ref = model(x, x)
    with torch.autocast("cpu", dtype=dtype):
        logits, loss = model(x, x)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.05
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="d_model"):
        SparseTransformerConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="pos_shape"):
        SparseTransformerConfig(n_ctx=64, pos_shape=(4, 4))
    with pytest.raises(ValueError, match="impl"):
        SparseTransformerConfig(impl="xla")
    with pytest.raises(ValueError, match="local_attn_ctx"):
        SparseTransformerConfig(n_ctx=64, patterns=[Mode("local", 40)])
    with pytest.raises(ValueError, match="patterns"):
        SparseTransformerConfig(patterns=[])
    model = _model(FACTORISATIONS["dense"], n_ctx=64)
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(1, 65, dtype=torch.int64))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 8))


def _check_static(model, x, lengths, step, bounded, kernel=False, monkeypatch=None):
    """A static cache (rows at different positions: prompts of ``lengths``, steps of ``step``
    tokens) gives every row's logits of one full pass, at every position."""
    from sparse_attention.torch import decode as dec

    if kernel and monkeypatch is not None:
        monkeypatch.setattr(dec, "KERNEL_ON_CPU", True)
    B, T = x.shape
    t0 = max(lengths)
    dev = x.device
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_static_cache(B, bounded=bounded, max_query=step)
        if kernel:  # slots nobody wrote are NaN: a key read outside the pattern shows up
            for layer in cache.layers:
                layer.k.fill_(float("nan"))
                layer.v.fill_(float("nan"))
        last = model.prefill(x[:, :t0], cache, lengths)
        rows = torch.arange(B, device=dev)
        ends = torch.tensor(lengths, device=dev)
        exact = x.device.type == "cpu" and not kernel and full.dtype == torch.float64
        tol = dict(rtol=1e-9, atol=1e-9) if exact else dict(rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(last, full[rows, ends - 1], **tol)
        while int(cache.lengths.max()) + step <= T:
            pos = cache.lengths[:, None] + torch.arange(step, device=dev)
            logits, _ = model(torch.gather(x, 1, pos), cache=cache)
            torch.testing.assert_close(logits, full[rows[:, None], pos], **tol)


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("name", list(FACTORISATIONS))
def test_static_cache_equals_full_forward(name, bounded):
    model = _model(FACTORISATIONS[name]).double()
    x = torch.randint(0, 256, (3, 96), generator=torch.Generator().manual_seed(1))
    _check_static(model, x, [17, 40, 3], step=1, bounded=bounded)
    _check_static(model, x, [64, 64, 64], step=3, bounded=bounded)


@pytest.mark.parametrize("name", ["fixed-merged", "strided-interleaved", "strided-heads", "dense", "custom-layout"])
def test_static_cache_through_decode_kernel(name, monkeypatch):
    pytest.importorskip("triton")
    from tests._kernel_env import INTERPRET

    if not INTERPRET:
        pytest.skip("the interpreter runs the decode kernel on CPU tensors (CUDA: test_model_gpu)")
    model = _model(FACTORISATIONS[name])
    x = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(2))
    _check_static(model, x, [33, 50], step=1, bounded=True, kernel=True, monkeypatch=monkeypatch)


def test_static_generate_matches_the_growing_cache():
    model = _model(FACTORISATIONS["fixed-interleaved"]).double()
    prompt = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    a = model.generate(prompt, 30, generator=torch.Generator().manual_seed(4), static=False)
    b = model.generate(prompt, 30, generator=torch.Generator().manual_seed(4), static=True, bounded_cache=True)
    torch.testing.assert_close(a, b)


def test_generate_with_prompt_lengths_continues_each_row():
    model = _model(FACTORISATIONS["strided-merged"]).double()
    prompt = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 10, top_k=1, prompt_lengths=[7, 20])  # greedy: rows independent
    alone = model.generate(prompt[:1, :7], 10, top_k=1, static=True)
    assert out.shape == (2, 30)
    torch.testing.assert_close(out[0, :17], alone[0])
    torch.testing.assert_close(out[:, :7], prompt[:, :7])


def test_static_cache_errors():
    model = _model(FACTORISATIONS["dense"])
    cache = model.new_static_cache(1)
    with pytest.raises(ValueError, match="max_query"):
        model(torch.zeros(1, 2, dtype=torch.int64), cache=cache)
    with pytest.raises(ValueError, match="holds 1 sequences"):
        model.prefill(torch.zeros(2, 4, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="lengths"):
        model.prefill(torch.zeros(1, 4, dtype=torch.int64), cache, [5])
    with pytest.raises(ValueError, match="static"):
        model.generate(torch.zeros(1, 4, dtype=torch.int64), 2, prompt_lengths=[3], static=False)


def test_forward_pads_to_a_multiple_of_128_for_the_fused_kernels():
    """The sparse model runs a 90-token input at 128 (the kernels' tiles follow time's power-of-two
    divisor); logits of the real tokens are unchanged, custom layouts keep their own length."""
    model = _model(FACTORISATIONS["fixed-merged"]).double()
    assert model.cfg.pad_multiple == 128
    seen = []
    hook = model.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    x = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(7))
    logits, _ = model(x)
    hook.remove()
    assert seen == [128] and logits.shape[1] == 90
    dense = _model(FACTORISATIONS["fixed-merged"], impl="dense").double()
    dense.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits, dense(x)[0], rtol=1e-9, atol=1e-9)
    assert _model(FACTORISATIONS["custom-layout"]).cfg.pad_multiple == 96


def _gqa_model(patterns, kv_heads, n_ctx=96):
    torch.manual_seed(0)
    cfg = SparseTransformerConfig(
        n_ctx=n_ctx, d_model=32, n_head=4, n_kv_head=kv_heads, n_layer=2, patterns=patterns, blocksize=16
    )
    return SparseTransformer(cfg)


GQA_FACTORISATIONS = ["fixed-merged", "strided-heads", "custom-layout"]


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("name", GQA_FACTORISATIONS)
def test_grouped_query_model_caches(name, kv_heads, monkeypatch):
    """A model with ``n_kv_head`` key/value heads for 4 query heads: its projection makes fewer
    k/v columns, its caches hold ``kv_heads`` heads, and every cache (growing, bounded, static,
    static through the decode kernel in the interpreter) gives the logits of one full pass."""
    patterns = FACTORISATIONS[name]
    if name == "custom-layout":
        patterns = [Custom(from_dense(_random_causal_mask(96, 4), 16))]
    model = _gqa_model(patterns, kv_heads).double().eval()
    assert model.blocks[0].attn.qkv.out_features == 32 + 2 * 8 * kv_heads
    x = torch.randint(0, 256, (2, 75), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache()
    _check_stepwise(model, x, 20, 1, cache)
    assert cache.k[0].shape[1] == kv_heads
    _check_stepwise(model, x, 20, 3, model.new_cache(bounded=True))
    x = torch.randint(0, 256, (3, 96), generator=torch.Generator().manual_seed(2))
    for bounded in (False, True):
        _check_static(model, x, [17, 40, 3], step=1, bounded=bounded)
    static = model.new_static_cache(3)
    assert static.layers[0].k.shape[1] == kv_heads
    full_heads = _gqa_model(patterns, 4).double().new_static_cache(3)
    assert static.nbytes()[0] * (4 // kv_heads) == full_heads.nbytes()[0]
    pytest.importorskip("triton")
    from tests._kernel_env import INTERPRET

    if INTERPRET and kv_heads == 2 and name == "fixed-merged":  # the rest: tests/test_decode.py
        _check_static(model.float(), x, [33, 50, 7], step=1, bounded=True, kernel=True, monkeypatch=monkeypatch)


def test_n_kv_head_errors():
    with pytest.raises(ValueError, match="n_kv_head must be a positive divisor of n_head"):
        SparseTransformerConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        SparseTransformerConfig(n_head=4, n_kv_head=0)


@pytest.mark.parametrize("impl", ["sparse", "dense"])
@pytest.mark.parametrize("name", ["fixed-merged", "strided-heads", "per-block-ratio", "fixed-interleaved"])
def test_packed_documents_equal_each_document_alone(name, impl):
    """``model(idx [1, time], targets, cu_seqlens=cu)``: logits equal the model on each document
    alone (positions from the document's first token, attention within it), time beyond n_ctx;
    the loss is the mean over the documents' tokens and its gradient flows. The sparse path
    runs patterns of built-in modes and the interleaved ``fixed``'s own-group head (``Group``)."""
    model = _model(FACTORISATIONS[name], impl=impl, recompute=impl == "sparse").double()
    cu = [0, 40, 41, 137, 200]
    idx = torch.randint(0, 256, (1, 200))
    logits, loss = model(idx, idx, cu_seqlens=cu)
    with torch.no_grad():
        want = torch.cat([model(idx[:, s:e])[0] for s, e in zip(cu[:-1], cu[1:])], dim=1)
    torch.testing.assert_close(logits.detach(), want)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="at most n_ctx"):
        model(idx, cu_seqlens=[0, 100, 200])
    with pytest.raises(ValueError, match="idx \\[1, time\\]"):
        model(idx.expand(2, -1), cu_seqlens=cu)
