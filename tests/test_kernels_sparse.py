"""Sparse mode of the fused indexer KL loss (`indexcache_train.kernels.sparse`) against the materialising
reference: the loss and the three index gradients, for the Triton kernels (interpreter on CPU, compiled on a
GPU) and the chunked torch path."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so set it before the kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from indexcache_train.kernels.reference import reference_indexer_kl_loss  # noqa: E402
from indexcache_train.kernels.sparse import sparse_kl_accumulate  # noqa: E402

CUDA = torch.cuda.is_available()
PATHS = ["torch", "triton"]
# Without a GPU the Triton path runs under the interpreter on CPU tensors; with one, the small cases run the
# compiled kernels (fp32 operands) on CUDA copies.
TRITON_DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


def distinct_topk(batch, seq_len, k, generator, device="cpu", keep=0.7, dtype=torch.int64):
    """[B, L, k] index sets as an indexer's top-k gives them: distinct keys s <= t per row, -1 where fewer
    than k keys were eligible (some keys are dropped at random so that rows also run short before t >= k).
    Slots are shuffled so that -1 entries sit anywhere in a row."""
    scores = torch.rand(batch, seq_len, seq_len, generator=generator, device=device)
    eligible = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    eligible = eligible & (torch.rand(batch, seq_len, seq_len, generator=generator, device=device) < keep)
    eligible[..., 0] = True
    scores = scores.masked_fill(~eligible, float("-inf"))
    vals, idx = scores.topk(min(k, seq_len), dim=-1)
    idx = torch.where(torch.isfinite(vals), idx, -1)
    if k > seq_len:
        idx = torch.cat([idx, idx.new_full((batch, seq_len, k - seq_len), -1)], dim=-1)
    perm = torch.rand(batch, seq_len, k, generator=generator, device=device).argsort(-1)
    return idx.gather(-1, perm).to(dtype)


def make_inputs(B, L, Hi, Di, G, H, Hk, D, k, *, seed=0, dtype=torch.float64, device="cpu",
                idx_dtype=torch.int64):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    index_q = randn(B, L, Hi, Di, std=Di ** -0.25)
    index_k = randn(B, L, Di, std=Di ** -0.25)
    index_weights = randn(B, L, Hi, std=Hi ** -0.5 * 2)
    teacher_q = randn(G, B, H, L, D)
    teacher_k = randn(G, B, Hk, L, D)
    idx = distinct_topk(B, L, k, gen, device=device, dtype=idx_dtype)
    return index_q, index_k, index_weights, teacher_q, teacher_k, D ** -0.5, idx


def reference_grads(index_q, index_k, index_weights, teacher_q, teacher_k, scale, idx, dtype=torch.float64):
    xs = [x.detach().to(dtype).requires_grad_() for x in (index_q, index_k, index_weights)]
    loss = reference_indexer_kl_loss(*xs, teacher_q.to(dtype), teacher_k.to(dtype), scale, topk_indices=idx)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def run_kernel(path, index_q, index_k, index_weights, teacher_q, teacher_k, scale, idx, grad_scale=None,
               prefill=None, teacher_lse=None):
    B, L = index_q.shape[:2]
    home = index_q.device
    if path == "triton" and home.type == "cpu":
        index_q, index_k, index_weights, teacher_q, teacher_k, idx = (
            x.to(TRITON_DEVICE) for x in (index_q, index_k, index_weights, teacher_q, teacher_k, idx))
        teacher_lse = None if teacher_lse is None else teacher_lse.to(TRITON_DEVICE)
    accs = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (index_q, index_k, index_weights)]
    if prefill is not None:
        for a, p in zip(accs, prefill):
            a.copy_(p)
    grad_scale = 1.0 / (B * L) if grad_scale is None else grad_scale
    total = sparse_kl_accumulate(index_q, index_k, index_weights, teacher_q, teacher_k, scale, idx, grad_scale,
                                 *accs, use_triton=path == "triton", teacher_lse=teacher_lse)
    assert total.dtype == torch.float32 and total.dim() == 0 and not total.requires_grad
    return total.to(home), [a.to(home) for a in accs]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close_all(total, accs, ref_loss, ref_grads, rows, tol):
    assert rel_err(total / rows, ref_loss) < tol, (total / rows, ref_loss)
    for name, a, g in zip(("d_index_q", "d_index_k", "d_index_weights"), accs, ref_grads):
        assert rel_err(a, g) < tol, (name, rel_err(a, g))


# (B, L, Hi, Di, G, H, Hk, D, k): odd L, G in {1,2,3}, Hk in {1, H} and between, k < L and k >= L, non-power-of-2
# dims. H/Hk >= 16 takes the tensor-core (shared-key) path of the Triton kernel, H/Hk < 16 the per-head path.
CASES = {
    "mqa_dot_G2": (2, 13, 4, 16, 2, 32, 1, 24, 8),
    "mqa_small_G1": (1, 11, 3, 20, 1, 4, 1, 40, 5),
    "mha_G3": (1, 9, 2, 16, 3, 3, 3, 20, 6),
    "gqa_dot_kgeL": (1, 7, 5, 16, 2, 32, 2, 24, 9),
    "mha_kgeL": (2, 5, 4, 16, 1, 2, 2, 16, 24),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(path, case):
    B, L, Hi, Di, G, H, Hk, D, k = CASES[case]
    inputs = make_inputs(B, L, Hi, Di, G, H, Hk, D, k, seed=len(case),
                         idx_dtype=torch.int32 if "G2" in case or "G3" in case else torch.int64)
    ref_loss, ref_grads = reference_grads(*inputs)
    total, accs = run_kernel(path, *[x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs])
    assert_close_all(total, accs, ref_loss, ref_grads, B * L, 2e-5)


def selection_lse(teacher_q, teacher_k, scale, idx):
    """[G, B, H, L] natural-log LSE of each head over its row's selection, as the attention kernel gives it."""
    G, B, H, L, D = teacher_q.shape
    keys = teacher_k.repeat_interleave(H // teacher_k.shape[2], dim=2).double()
    scores = torch.einsum("gbhtd,gbhsd->gbhts", teacher_q.double(), keys) * scale
    chosen = torch.zeros(B, L, L + 1, dtype=torch.bool).scatter_(-1, torch.where(idx >= 0, idx, L).long(), True)
    return scores.masked_fill(~chosen[None, :, None, :, :L], float("-inf")).logsumexp(-1).float()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["mqa_dot_G2", "mha_G3"])
def test_a_given_teacher_lse_gives_the_same_loss(path, case):
    """The sparse forward hands over its attention's log-sum-exp; the teacher's first pass is then skipped."""
    inputs = make_inputs(*CASES[case], seed=3, dtype=torch.float32)
    computed = run_kernel(path, *inputs)
    given = run_kernel(path, *inputs, teacher_lse=selection_lse(*inputs[3:]))
    assert rel_err(given[0], computed[0]) < 1e-5
    for a, b in zip(given[1], computed[1]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_empty_and_single_key_rows(path):
    """A row with no valid slot contributes 0 to the loss (but counts in the mean) and no gradient; a row
    with one key has p = q = 1: zero loss and zero gradient."""
    B, L, Hi, Di, G, H, Hk, D, k = 2, 9, 4, 16, 2, 16, 1, 32, 6
    index_q, index_k, index_weights, teacher_q, teacher_k, scale, idx = make_inputs(B, L, Hi, Di, G, H, Hk, D, k,
                                                                                   seed=3, dtype=torch.float32)
    idx[0, 4] = -1  # an empty row
    idx[1, 6] = -1
    idx[1, 6, 2] = 3  # a single key, in the middle of the row
    ref_loss, ref_grads = reference_grads(index_q, index_k, index_weights, teacher_q, teacher_k, scale, idx)
    total, (dq, dk, dw) = run_kernel(path, index_q, index_k, index_weights, teacher_q, teacher_k, scale, idx)
    assert_close_all(total, (dq, dk, dw), ref_loss, ref_grads, B * L, 2e-5)
    for r in ((0, 4), (1, 6)):
        assert dq[r].abs().max() == 0 and dw[r].abs().max() == 0

    # Every row empty: loss 0, nothing accumulated.
    total, accs = run_kernel(path, index_q, index_k, index_weights, teacher_q, teacher_k, scale,
                             torch.full_like(idx, -1))
    assert total.item() == 0.0 and all(a.abs().max() == 0 for a in accs)


@pytest.mark.parametrize("path", PATHS)
def test_grad_scale_and_prefilled_accumulators(path):
    """The accumulators are added to, scaled by grad_scale; the returned loss is the unscaled row sum."""
    B, L, Hi, Di, G, H, Hk, D, k = 1, 10, 4, 16, 2, 16, 1, 24, 7
    inputs = make_inputs(B, L, Hi, Di, G, H, Hk, D, k, seed=5, dtype=torch.float32)
    ref_loss, ref_grads = reference_grads(*inputs)
    gen = torch.Generator().manual_seed(9)
    prefill = [torch.randn(g.shape, generator=gen) for g in ref_grads]
    grad_scale = -2.5
    total, accs = run_kernel(path, *inputs, grad_scale=grad_scale, prefill=prefill)
    expected = [p.double() + g * (grad_scale * B * L) for p, g in zip(prefill, ref_grads)]
    assert rel_err(total / (B * L), ref_loss) < 2e-5
    for a, e in zip(accs, expected):
        assert rel_err(a, e) < 2e-5


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_and_mixed_dtypes(path):
    """Views with odd strides (teacher in [G, B, L, H, D] memory, indices sliced from a wider tensor) and
    int32 indices give the same result as contiguous inputs."""
    B, L, Hi, Di, G, H, Hk, D, k = 2, 8, 4, 16, 1, 16, 1, 24, 5
    index_q, index_k, index_weights, teacher_q, teacher_k, scale, idx = make_inputs(B, L, Hi, Di, G, H, Hk, D, k,
                                                                                   seed=11, dtype=torch.float32)
    ref_loss, ref_grads = reference_grads(index_q, index_k, index_weights, teacher_q, teacher_k, scale, idx)
    tq = teacher_q.transpose(2, 3).contiguous().transpose(2, 3)
    tk = teacher_k.transpose(2, 3).contiguous().transpose(2, 3)
    wide = torch.full((B, L, 2 * k), -1, dtype=torch.int32)
    wide[..., ::2] = idx
    total, accs = run_kernel(path, index_q, index_k, index_weights.transpose(0, 1).contiguous().transpose(0, 1),
                             tq, tk, scale, wide[..., ::2])
    assert_close_all(total, accs, ref_loss, ref_grads, B * L, 2e-5)


def test_bf16_inputs_torch_path():
    """bf16 inputs: the torch path computes in fp32 on the bf16 values."""
    B, L, Hi, Di, G, H, Hk, D, k = 2, 11, 4, 16, 2, 8, 1, 24, 6
    inputs = make_inputs(B, L, Hi, Di, G, H, Hk, D, k, seed=13, dtype=torch.bfloat16)
    ref_loss, ref_grads = reference_grads(*inputs)  # the same bf16 values, upcast to fp64
    total, accs = run_kernel("torch", *inputs)
    assert_close_all(total, accs, ref_loss, ref_grads, B * L, 1e-4)


def test_triton_matches_torch_path():
    """Both implementations agree on one larger case with many -1 slots."""
    B, L, Hi, Di, G, H, Hk, D, k = 1, 24, 16, 32, 2, 16, 1, 40, 20
    inputs = make_inputs(B, L, Hi, Di, G, H, Hk, D, k, seed=17, dtype=torch.float32)
    t_total, t_accs = run_kernel("triton", *inputs)
    p_total, p_accs = run_kernel("torch", *inputs)
    assert rel_err(t_total, p_total) < 1e-5
    for a, b in zip(t_accs, p_accs):
        assert rel_err(a, b) < 1e-5


# --------------------------------------------------------------------------------------------------- GPU ---
GPU_CASES = {
    # Absorbed MLA: one shared 512+64 latent key per token (MQA), 128 heads.
    "absorbed_mla": (1, 2048, 64, 128, 2, 128, 1, 576, 512),
    # Expanded MHA, 128 heads x 192: the per-head gather path.
    "mha_192": (1, 1024, 64, 128, 1, 128, 128, 192, 256),
    # Short rows (k > L / 2, many -1 slots), batch 2, G = 3.
    "gqa_short": (2, 384, 32, 128, 3, 64, 4, 192, 256),
}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_bf16(case):
    B, L, Hi, Di, G, H, Hk, D, k = GPU_CASES[case]
    inputs = make_inputs(B, L, Hi, Di, G, H, Hk, D, k, seed=1, dtype=torch.bfloat16, device="cuda",
                         idx_dtype=torch.int32)
    ref_loss, ref_grads = reference_grads(*inputs, dtype=torch.float32)
    total, accs = run_kernel("triton", *inputs)
    assert_close_all(total, accs, ref_loss, ref_grads, B * L, 1e-2)
    if case != "mha_192":  # the torch path's per-head loop is slow at 128 kv heads
        total, accs = run_kernel("torch", *inputs)
        assert_close_all(total, accs, ref_loss, ref_grads, B * L, 1e-2)
