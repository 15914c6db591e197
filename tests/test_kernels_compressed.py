"""The indexer KL over compressed candidates (`kernels.compressed`, DeepSeek-V4's CSA) against its
materialising reference: loss and the three index gradients, dense (the strided reduction onto the causal
kernel) and sparse (entry top-k with -1 slots), for the Triton kernels (interpreter on CPU) and the torch path."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from indexcache_train.kernels.compressed import CompressedIndexerKL, check_compressed_topk  # noqa: E402
from indexcache_train.kernels.reference import (  # noqa: E402
    compressed_support_mask,
    reference_compressed_indexer_kl_loss,
)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


def inputs(batch, seq_len, rate, layers=2, heads=4, dim=16, index_heads=2, index_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    entries = seq_len // rate
    index = [torch.randn(batch, seq_len, index_heads, index_dim, generator=g),
             torch.randn(batch, entries, index_dim, generator=g),
             torch.rand(batch, seq_len, index_heads, generator=g)]
    teacher_q = torch.randn(layers, batch, heads, seq_len, dim, generator=g) * 2
    teacher_k = torch.randn(layers, batch, 1, entries, dim, generator=g)
    return index, teacher_q, teacher_k


def entry_topk(batch, seq_len, rate, k, seed=0):
    """Per row the top-k of random scores over the visible entries, -1 in slots beyond them (as V4's
    indexer returns them)."""
    g = torch.Generator().manual_seed(seed + 1)
    entries = seq_len // rate
    visible = compressed_support_mask(batch, seq_len, rate, "cpu")
    scores = torch.rand(batch, seq_len, entries, generator=g).masked_fill(~visible, float("-inf"))
    top = scores.topk(min(k, entries), dim=-1)
    return torch.where(top.values > float("-inf"), top.indices, -1)


def kernel_loss(index, teacher_q, teacher_k, rate, topk, backend, scale=0.25):
    leaves = [t.clone().to(DEVICE).requires_grad_(True) for t in index]
    kl = CompressedIndexerKL(*leaves, compress_rate=rate, num_layers=teacher_q.shape[0],
                             topk_indices=None if topk is None else topk.to(DEVICE), backend=backend)
    for layer in range(teacher_q.shape[0]):
        kl.add_layer(teacher_q[layer].to(DEVICE), teacher_k[layer].to(DEVICE), scale)
    loss = kl.loss()
    loss.backward()
    return loss.detach().cpu(), [t.grad.cpu() for t in leaves]


def reference_loss(index, teacher_q, teacher_k, rate, topk, scale=0.25):
    leaves = [t.clone().double().requires_grad_(True) for t in index]
    # Eq. 1: the mean over the served layers of each layer's KL.
    loss = sum(reference_compressed_indexer_kl_loss(*leaves, teacher_q[g:g + 1].double(),
                                                    teacher_k[g:g + 1].double(), scale, compress_rate=rate,
                                                    topk_indices=topk)
               for g in range(teacher_q.shape[0])) / teacher_q.shape[0]
    loss.backward()
    return loss.detach().float(), [t.grad.float() for t in leaves]


# The interpreter is slow: Triton takes the odd-length case, the torch path all of them. On CUDA Triton's fp32
# dots are TF32, too coarse for these tolerances: it runs in the bf16 case at the end instead.
CASES = ([("triton", 37, 4)] if DEVICE == "cpu" else []) + [
    ("torch", seq_len, rate) for seq_len, rate in [(37, 4), (32, 4), (20, 1), (30, 3)]]


@pytest.mark.parametrize("stage", ["dense", "sparse"])
@pytest.mark.parametrize("backend, seq_len, rate", CASES)
def test_matches_the_reference(backend, stage, seq_len, rate):
    index, teacher_q, teacher_k = inputs(2, seq_len, rate)
    topk = entry_topk(2, seq_len, rate, k=3) if stage == "sparse" else None
    loss, grads = kernel_loss(index, teacher_q, teacher_k, rate, topk, backend)
    expected, expected_grads = reference_loss(index, teacher_q, teacher_k, rate, topk)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_entry_counts_once_its_window_is_complete(backend):
    """Entry 3 pools tokens 12..15: bumping its teacher key moves the index-query gradients of queries
    15 on, and leaves those of queries 0..14 bitwise alone."""
    index, teacher_q, teacher_k = inputs(1, 24, 4, layers=1)
    bumped = teacher_k.clone()
    bumped[..., 3, :] += 3.0
    _, (before, _, _) = kernel_loss(index, teacher_q, teacher_k, 4, None, backend)
    _, (after, _, _) = kernel_loss(index, teacher_q, bumped, 4, None, backend)
    assert torch.equal(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15], after[:, 15])
    assert torch.equal(before[:, :3], torch.zeros_like(before[:, :3]))  # queries 0..2 see no entry yet


def test_sparse_topk_outside_the_complete_windows_is_refused():
    topk = entry_topk(1, 16, 4, k=2)
    topk[0, 6, 0] = 1  # query 6: only entry 0 (tokens 0..3) is complete
    with pytest.raises(ValueError, match=r"topk_indices\[0, 6, 0\] = 1 is outside \[-1, 0\]"):
        check_compressed_topk(topk, 4, 4)


def test_index_keys_must_be_the_entries():
    index, _, _ = inputs(1, 16, 4)
    with pytest.raises(ValueError, match="must hold the 4 compressed entries"):
        CompressedIndexerKL(index[0], index[1][:, :3], index[2], compress_rate=4, num_layers=1)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="native Triton on CUDA")
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_gpu_bf16_matches_the_reference(stage):
    """DeepSeek-V4-like tiles in bf16 on CUDA (index heads 16 x 128, a one-head teacher of dim 512, compress
    rate 4, L = 1024, top-64 entries), against the fp64 reference on the same bf16 values."""
    index, teacher_q, teacher_k = inputs(1, 1024, 4, heads=16, dim=512, index_heads=16, index_dim=128, seed=3)
    index, teacher_q, teacher_k = [t.bfloat16() for t in index], teacher_q.bfloat16(), teacher_k.bfloat16()
    topk = entry_topk(1, 1024, 4, k=64) if stage == "sparse" else None
    loss, grads = kernel_loss(index, teacher_q, teacher_k, 4, topk, "triton", scale=512 ** -0.5)
    expected, expected_grads = reference_loss(index, teacher_q, teacher_k, 4, topk, scale=512 ** -0.5)
    assert abs(loss.item() - expected.item()) < 1e-2 * expected.item()
    for grad, want in zip(grads, expected_grads):
        error = ((grad.double() - want.double()).norm() / want.double().norm()).item()
        assert error < 2e-2, error
