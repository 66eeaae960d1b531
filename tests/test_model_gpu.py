"""The model on CUDA (marker ``gpu``; skipped without CUDA): fused kernels inside the model agree
with the CPU model, under bf16 autocast, and sampling through the KV cache matches the full pass."""

import pytest

torch = pytest.importorskip("torch")

from sparse_attention.models import SparseTransformer, SparseTransformerConfig, paper_patterns  # noqa: E402

pytestmark = pytest.mark.gpu

PATTERNS = {
    "fixed": paper_patterns("fixed", "merged", stride=128, c=32),
    # Group heads (the own group of 128): causal SDPA over the groups as a batch of views
    "fixed-interleaved": paper_patterns("fixed", "interleaved", stride=128, c=32),
    "fixed-heads": paper_patterns("fixed", "heads", stride=128, c=32),
    "strided-interleaved": paper_patterns("strided", "interleaved", stride=128),
    "strided-merged": paper_patterns("strided", "merged", stride=128),
    "strided-heads": paper_patterns("strided", "heads", stride=128),
}


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def _model(name):
    torch.manual_seed(0)
    cfg = SparseTransformerConfig(n_ctx=1024, d_model=128, n_head=4, n_layer=2, patterns=PATTERNS[name])
    return SparseTransformer(cfg)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cuda_model_matches_cpu(cuda, name):
    model = _model(name)
    x = torch.randint(0, 256, (2, 1024), generator=torch.Generator().manual_seed(1))
    _, ref = model(x, x)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model = model.to(cuda)
    _, loss32 = model(x.to(cuda), x.to(cuda))
    assert abs(loss32.item() - ref.item()) < 2e-3
    loss32.backward()
    for p, g in zip(model.parameters(), ref_grads):
        assert (p.grad.cpu() - g).norm() <= 2e-2 * g.norm() + 1e-6
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss16 = model(x.to(cuda), x.to(cuda))
    assert abs(loss16.item() - ref.item()) < 3e-2


@pytest.mark.parametrize("name", ["fixed", "strided-merged"])
def test_cuda_sampling_matches_full_pass(cuda, name):
    model = _model(name).to(cuda).eval()
    x = torch.randint(0, 256, (1, 300), device=cuda)
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache()
        steps = [model(x[:, :200], cache=cache)[0]]
        steps += [model(x[:, t : t + 1], cache=cache)[0] for t in range(200, 300)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("name", list(PATTERNS) + ["local", "dense"])
def test_static_cache_decode_kernel_matches_full_pass(cuda, name, bounded):
    """Rows at different positions decode through the kernel (unused slots NaN) to the full pass's logits."""
    from tests.test_model import _check_static

    specs = {"local": paper_patterns("local", stride=128), "dense": paper_patterns("dense")}
    torch.manual_seed(0)
    cfg = SparseTransformerConfig(
        n_ctx=1024, d_model=128, n_head=4, n_layer=2, patterns=specs.get(name) or PATTERNS[name]
    )
    model = SparseTransformer(cfg).to(cuda)
    x = torch.randint(0, 256, (3, 1024), device=cuda, generator=torch.Generator(device=cuda).manual_seed(1))
    _check_static(model, x[:, :700], [300, 517, 640], step=1, bounded=bounded, kernel=True, monkeypatch=None)


@pytest.mark.parametrize("name", ["fixed", "strided-interleaved"])
def test_cuda_graph_generate_equals_eager(cuda, name):
    model = _model(name).to(cuda)
    prompt = torch.randint(0, 256, (2, 200), device=cuda)
    a = model.generate(prompt, 40, top_k=1, prompt_lengths=[150, 200])
    b = model.generate(prompt, 40, top_k=1, prompt_lengths=[150, 200], cuda_graph=True)
    c = model.generate(prompt, 40, top_k=1, prompt_lengths=[150, 200], cuda_graph=True, bounded_cache=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
