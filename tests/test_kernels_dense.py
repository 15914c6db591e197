"""Dense mode of the fused indexer KL loss (`indexcache_train.kernels.dense`) against the materialising
reference: the loss value and the three index gradients, for the Triton kernels (under TRITON_INTERPRET=1 on
CPU, natively on CUDA) and for the chunked torch path. GPU tests (`-m gpu`) use bf16 and realistic tiles."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined (tests/conftest.py also sets it first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from indexcache_train.kernels import dense  # noqa: E402
from indexcache_train.kernels.dense import dense_kl_accumulate  # noqa: E402
from indexcache_train.kernels.reference import reference_indexer_kl_loss  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The Triton path runs on CPU under the interpreter (in fp64 inputs, computed in fp32), else on CUDA (fp32
# inputs, TF32 dots).
TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(B, L, Hi, Di, G, H, Hk, D, *, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    index_q = rand(B, L, Hi, Di, scale=2.0 * Di ** -0.5)
    index_k = rand(B, L, Di)
    index_w = rand(B, L, Hi, scale=Hi ** -0.5)
    teacher_q = rand(G, B, H, L, D, scale=1.5)
    teacher_k = rand(G, B, Hk, L, D)
    return index_q, index_k, index_w, teacher_q, teacher_k, D ** -0.5


def reference(index_q, index_k, index_w, teacher_q, teacher_k, scale, dtype=torch.float64, query_start=0):
    """Reference loss (mean over rows) and the gradients of that mean, computed in `dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (index_q, index_k, index_w)]
    loss = reference_indexer_kl_loss(*leaves, teacher_q.to(dtype), teacher_k.to(dtype), scale,
                                     query_start=query_start)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def row_block(inputs, start, end):
    """The query rows [start, end) of whole-sequence inputs, against all of its keys."""
    index_q, index_k, index_w, teacher_q, teacher_k, scale = inputs
    return index_q[:, start:end], index_k, index_w[:, start:end], teacher_q[..., start:end, :], teacher_k, scale


def run_dense(inputs, *, use_triton, grad_scale=None, prefill=None, query_start=0, **kwargs):
    index_q, index_k, index_w, teacher_q, teacher_k, scale = inputs
    B, L = index_q.shape[:2]
    grad_scale = 1.0 / (B * L) if grad_scale is None else grad_scale
    accs = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (index_q, index_k, index_w)]
    if prefill is not None:
        for acc, value in zip(accs, prefill):
            acc.copy_(value)
    if kwargs:  # tile / split overrides exist on the Triton launcher only
        assert use_triton
        total = dense._dense_kl_triton(index_q, index_k, index_w, teacher_q, teacher_k, scale, grad_scale,
                                       *accs, query_start=query_start, **kwargs)
    else:
        total = dense_kl_accumulate(index_q, index_k, index_w, teacher_q, teacher_k, scale, grad_scale, *accs,
                                    use_triton=use_triton, query_start=query_start)
    assert total.dtype == torch.float32 and total.dim() == 0 and not total.requires_grad
    return total, accs


def assert_close_rel(actual, expected, rtol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"


def check_against_reference(inputs, *, use_triton, rtol, query_start=0, **kwargs):
    B, L = inputs[0].shape[:2]
    ref_loss, ref_grads = reference(*inputs, query_start=query_start)
    total, accs = run_dense(inputs, use_triton=use_triton, query_start=query_start, **kwargs)
    assert abs(total.item() / (B * L) - ref_loss.item()) <= rtol * abs(ref_loss.item()) + 1e-7
    for acc, grad, name in zip(accs, ref_grads, ("d_index_q", "d_index_k", "d_index_weights")):
        assert_close_rel(acc, grad, rtol, name)


# Shapes: (B, L, Hi, Di, G, H, Hk, D). Odd L (not a multiple of the 32-row CPU tiles), G in {1, 2, 3},
# Hk = 1 (MQA), Hk = H (MHA) and a GQA case; D = 40 and 48 need the two-tile split of the head dim.
CASES = {
    "mqa_g1": (1, 45, 2, 16, 1, 4, 1, 40),
    "mha_g2": (2, 77, 3, 24, 2, 2, 2, 32),
    "gqa_g3": (1, 100, 4, 32, 3, 4, 2, 48),
}
TRITON_RTOL = 1e-4 if INTERPRET else 2e-2


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case):
    dtype = torch.float64 if INTERPRET else torch.float32
    inputs = make_inputs(*CASES[case], dtype=dtype, device=TRITON_DEVICE, seed=1)
    check_against_reference(inputs, use_triton=True, rtol=TRITON_RTOL)


@needs_triton
def test_triton_chunks_and_splits():
    """Several query chunks, key blocks split over programs, dK head splits adding with atomics."""
    dtype = torch.float64 if INTERPRET else torch.float32
    inputs = make_inputs(2, 77, 3, 24, 2, 4, 2, 32, dtype=dtype, device=TRITON_DEVICE, seed=2)
    cfg = dict(chunk_rows=128, ksplit=3, head_splits=2)
    if INTERPRET:
        cfg["chunk_rows"] = 32
    check_against_reference(inputs, use_triton=True, rtol=TRITON_RTOL, **cfg)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_matches_reference(case):
    inputs = make_inputs(*CASES[case], seed=3)
    check_against_reference(inputs, use_triton=False, rtol=1e-6)


def test_torch_small_chunks():
    inputs = make_inputs(2, 50, 3, 16, 2, 4, 1, 24, seed=4)
    ref_loss, ref_grads = reference(*inputs)
    B, L = 2, 50
    accs = [torch.zeros(x.shape, dtype=torch.float32) for x in inputs[:3]]
    total = dense._dense_kl_torch(*inputs, 1.0 / (B * L), *accs, chunk_rows=7)
    assert abs(total.item() / (B * L) - ref_loss.item()) < 1e-6
    for acc, grad in zip(accs, ref_grads):
        assert_close_rel(acc, grad, 1e-6, "grad")


@pytest.mark.parametrize("use_triton", [pytest.param(True, marks=needs_triton), False])
def test_accumulates_with_grad_scale(use_triton):
    """Accumulators are added to, scaled by grad_scale; the returned loss is the sum over rows."""
    device = TRITON_DEVICE if use_triton else "cpu"
    dtype = torch.float64 if device == "cpu" else torch.float32
    inputs = make_inputs(1, 40, 2, 16, 2, 2, 1, 16, dtype=dtype, device=device, seed=5)
    ref_loss, ref_grads = reference(*inputs)
    gen = torch.Generator().manual_seed(9)
    prefill = [torch.randn(x.shape, generator=gen).to(device) for x in inputs[:3]]
    grad_scale = 0.37
    total, accs = run_dense(inputs, use_triton=use_triton, grad_scale=grad_scale, prefill=prefill)
    rows = 40
    rtol = TRITON_RTOL if use_triton else 1e-6
    assert abs(total.item() - ref_loss.item() * rows) <= rtol * ref_loss.item() * rows
    for acc, pre, grad in zip(accs, prefill, ref_grads):
        # grad is d(mean)/dx = d(sum)/dx / rows
        assert_close_rel(acc - pre, grad * rows * grad_scale, rtol, "accumulated grad")


@pytest.mark.parametrize("use_triton", [pytest.param(True, marks=needs_triton), False])
def test_single_key_row(use_triton):
    """L = 1: the only row has the single key s = 0, so p = q = 1, the loss and every gradient are 0."""
    device = TRITON_DEVICE if use_triton else "cpu"
    dtype = torch.float64 if device == "cpu" else torch.float32
    inputs = make_inputs(2, 1, 2, 16, 1, 2, 2, 16, dtype=dtype, device=device, seed=6)
    total, accs = run_dense(inputs, use_triton=use_triton)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    for acc in accs:
        assert acc.abs().max().item() < 1e-6


@needs_triton
def test_triton_non_contiguous_inputs():
    """Teacher tensors as strided views (e.g. [G, B, L, H, D] storage) and index_k as a slice."""
    dtype = torch.float64 if INTERPRET else torch.float32
    index_q, index_k, index_w, teacher_q, teacher_k, scale = make_inputs(1, 50, 2, 16, 2, 4, 4, 32, dtype=dtype,
                                                                         device=TRITON_DEVICE, seed=7)
    teacher_q = teacher_q.transpose(2, 3).contiguous().transpose(2, 3)
    teacher_k = teacher_k.transpose(2, 3).contiguous().transpose(2, 3)
    index_k = torch.cat([index_k, index_k], dim=-1)[..., :16]
    assert not teacher_q.is_contiguous() and not index_k.is_contiguous()
    check_against_reference((index_q, index_k, index_w, teacher_q, teacher_k, scale), use_triton=True,
                            rtol=TRITON_RTOL)


# A block of query rows at an offset among the keys (a context-parallel rank's chunk): unaligned to the 32-row
# CPU tiles, a block of one row, a block at the start and one that ends before the last key.
OFFSET_BLOCKS = [(0, 13), (13, 14), (14, 50), (50, 77)]


@pytest.mark.parametrize("use_triton", [pytest.param(True, marks=needs_triton), False])
@pytest.mark.parametrize("block", OFFSET_BLOCKS[1:], ids=lambda b: f"rows{b[0]}-{b[1]}")
def test_query_offset_matches_reference(use_triton, block):
    device = TRITON_DEVICE if use_triton else "cpu"
    dtype = torch.float64 if device == "cpu" else torch.float32
    inputs = make_inputs(2, 77, 3, 24, 2, 4, 2, 40, dtype=dtype, device=device, seed=13)
    start, end = block
    check_against_reference(row_block(inputs, start, end), use_triton=use_triton,
                            rtol=TRITON_RTOL if use_triton else 1e-6, query_start=start)


@pytest.mark.parametrize("use_triton", [pytest.param(True, marks=needs_triton), False])
def test_query_offset_blocks_sum_to_the_whole(use_triton):
    """Blocks of rows, each at its offset and divided by the whole's row count, add up to the whole sequence's
    loss and gradients (the keys' gradients from every block into one accumulator); Triton in several query
    chunks of a block, with split key blocks and dK head splits."""
    device = TRITON_DEVICE if use_triton else "cpu"
    dtype = torch.float64 if device == "cpu" else torch.float32
    inputs = make_inputs(1, 77, 3, 24, 2, 4, 1, 40, dtype=dtype, device=device, seed=14)
    ref_loss, ref_grads = reference(*inputs)
    B, T = inputs[0].shape[:2]
    d_q, d_k, d_w = (torch.zeros(x.shape, dtype=torch.float32, device=device) for x in inputs[:3])
    splits = dict(chunk_rows=32 if INTERPRET else 128, ksplit=2, head_splits=2) if use_triton else {}
    total = 0.0
    for start, end in OFFSET_BLOCKS:
        index_q, index_k, index_w, teacher_q, teacher_k, scale = row_block(inputs, start, end)
        args = (index_q, index_k, index_w, teacher_q, teacher_k, scale, 1.0 / (B * T), d_q[:, start:end], d_k,
                d_w[:, start:end])
        if use_triton:
            total += dense._dense_kl_triton(*args, query_start=start, **splits).item()
        else:
            total += dense_kl_accumulate(*args, use_triton=False, query_start=start).item()
    rtol = TRITON_RTOL if use_triton else 1e-6
    assert abs(total / (B * T) - ref_loss.item()) <= rtol * ref_loss.item()
    for acc, grad, name in zip((d_q, d_k, d_w), ref_grads, ("d_index_q", "d_index_k", "d_index_weights")):
        assert_close_rel(acc, grad, rtol, name)


def test_query_offset_out_of_range_is_reported():
    index_q, index_k, index_w, teacher_q, teacher_k, scale = row_block(make_inputs(1, 20, 2, 16, 1, 2, 1, 16), 10, 20)
    accs = [torch.zeros(x.shape, dtype=torch.float32) for x in (index_q, index_k, index_w)]
    for query_start in (11, -1):
        with pytest.raises(ValueError, match="query_start"):
            dense_kl_accumulate(index_q, index_k, index_w, teacher_q, teacher_k, scale, 1.0, *accs, use_triton=False,
                                query_start=query_start)


def test_torch_bf16_inputs():
    """bf16 inputs on the torch path are computed in fp32: same as the reference on the same bf16 values."""
    inputs = make_inputs(1, 60, 3, 32, 2, 4, 1, 48, dtype=torch.bfloat16, seed=8)
    ref_loss, ref_grads = reference(*inputs, dtype=torch.float32)
    total, accs = run_dense(inputs, use_triton=False)
    assert abs(total.item() / 60 - ref_loss.item()) < 1e-4 * ref_loss.item()
    for acc, grad in zip(accs, ref_grads):
        assert_close_rel(acc, grad, 1e-4, "grad")


# ------------------------------------------------------------------------------------------------ GPU ----
GPU_CASES = {
    # DeepSeek-V3.2-like: 64 x 128 indexer, MHA teacher with D = 192 (128 + 64), odd L.
    "mha_d192": dict(B=1, L=1999, Hi=64, Di=128, G=2, H=16, Hk=16, D=192),
    # absorbed MLA (MQA, D = 512 + 64), GLM-5-like indexer.
    "mqa_d576": dict(B=1, L=1100, Hi=32, Di=128, G=1, H=16, Hk=1, D=576),
    # two batches, GQA, three layers.
    "gqa_b2": dict(B=2, L=2048, Hi=16, Di=128, G=3, H=8, Hk=2, D=128),
}


@gpu
@needs_cuda
@pytest.mark.skipif(INTERPRET, reason="native Triton on CUDA")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_bf16_matches_reference(case):
    c = GPU_CASES[case]
    inputs = make_inputs(c["B"], c["L"], c["Hi"], c["Di"], c["G"], c["H"], c["Hk"], c["D"], dtype=torch.bfloat16,
                         device="cuda", seed=11)
    ref_loss, ref_grads = reference(*inputs, dtype=torch.float32)
    rows = c["B"] * c["L"]
    total, accs = run_dense(inputs, use_triton=True)
    assert abs(total.item() / rows - ref_loss.item()) < 1e-2 * ref_loss.item()
    for acc, grad, name in zip(accs, ref_grads, ("d_index_q", "d_index_k", "d_index_weights")):
        assert_close_rel(acc, grad, 1e-2, name)


@gpu
@needs_cuda
@pytest.mark.skipif(INTERPRET, reason="native Triton on CUDA")
@pytest.mark.parametrize("case", ["mha_d192", "mqa_d576"])
def test_gpu_bf16_query_offset_matches_reference(case):
    """A context-parallel rank's chunk: rows at an offset that is no multiple of the tiles, against every key
    of the sequence (keys past the block's last row included, and ignored)."""
    c = GPU_CASES[case]
    inputs = make_inputs(c["B"], c["L"], c["Hi"], c["Di"], c["G"], c["H"], c["Hk"], c["D"], dtype=torch.bfloat16,
                         device="cuda", seed=15)
    start, end = c["L"] // 3 + 5, 2 * c["L"] // 3
    block = row_block(inputs, start, end)
    ref_loss, ref_grads = reference(*block, dtype=torch.float32, query_start=start)
    total, accs = run_dense(block, use_triton=True, query_start=start)
    assert abs(total.item() / (c["B"] * (end - start)) - ref_loss.item()) < 1e-2 * ref_loss.item()
    for acc, grad, name in zip(accs, ref_grads, ("d_index_q", "d_index_k", "d_index_weights")):
        assert_close_rel(acc, grad, 1e-2, name)


@gpu
@needs_cuda
@pytest.mark.skipif(INTERPRET, reason="native Triton on CUDA")
def test_gpu_chunked_matches_unchunked():
    """Several query chunks (the 128K regime) give the same result as one; the torch path agrees too."""
    inputs = make_inputs(1, 1536, 32, 128, 2, 16, 16, 192, dtype=torch.bfloat16, device="cuda", seed=12)
    full_total, full = run_dense(inputs, use_triton=True)
    chunk_total, chunked = run_dense(inputs, use_triton=True, chunk_rows=256, ksplit=5, head_splits=4)
    torch_total, torch_accs = run_dense(inputs, use_triton=False)
    assert abs(chunk_total.item() - full_total.item()) < 1e-4 * abs(full_total.item())
    assert abs(torch_total.item() - full_total.item()) < 1e-3 * abs(full_total.item())
    for a, b, c in zip(chunked, full, torch_accs):
        assert_close_rel(a, b, 1e-4, "chunked vs unchunked")
        assert_close_rel(c, b, 1e-2, "torch vs triton")
