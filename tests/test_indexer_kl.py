"""The public KL entry points: dispatch, validation, autograd and the layer-by-layer form."""

import pytest
import torch

from indexcache_train.kernels import IndexerKLLoss, indexer_kl_loss, reference_indexer_kl_loss


def make_inputs(seed=0, batch=2, seq_len=37, index_heads=3, index_dim=16, groups=2, heads=4, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    index = [torch.randn(batch, seq_len, index_heads, index_dim, generator=g) / 2,
             torch.randn(batch, seq_len, index_dim, generator=g) / 2,
             torch.randn(batch, seq_len, index_heads, generator=g)]
    teacher_q = torch.randn(groups, batch, heads, seq_len, dim, generator=g)
    teacher_k = torch.randn(groups, batch, kv_heads, seq_len, dim, generator=g)
    return [t.requires_grad_() for t in index], teacher_q, teacher_k


def random_topk(batch, seq_len, k, seed=0):
    """Distinct causal indices per row, -1 where a row has fewer than k keys."""
    scores = torch.rand(batch, seq_len, seq_len, generator=torch.Generator().manual_seed(seed))
    scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    values, indices = scores.topk(k, dim=-1)
    return torch.where(values.isinf(), -1, indices)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sparse", [False, True])
def test_matches_reference_with_grad_output(backend, sparse):
    index, tq, tk = make_inputs()
    topk = random_topk(2, 37, 8) if sparse else None
    if backend == "triton" and torch.cuda.is_available():  # native kernels, fp32 so the tolerance holds
        index = [t.detach().cuda().requires_grad_() for t in index]
        tq, tk, topk = tq.cuda(), tk.cuda(), None if topk is None else topk.cuda()
    ours = indexer_kl_loss(*index, tq, tk, 0.3, topk_indices=topk, backend=backend)
    ref = reference_indexer_kl_loss(*index, tq, tk, 0.3, topk_indices=topk)
    pairs = [(ours, ref), *zip(grads(2.5 * ours, index), grads(2.5 * ref, index))]
    for a, b in pairs:
        if a.is_cuda:  # fp32 tl.dot runs in TF32 on GPU: compare norms, ~1e-3 relative error
            assert (a - b).norm() <= 1e-2 * b.norm()
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_layer_by_layer_form_has_the_same_gradient(sparse):
    index, tq, tk = make_inputs(groups=3)
    topk = random_topk(2, 37, 8) if sparse else None
    streamed = IndexerKLLoss(*index, num_layers=3, topk_indices=topk, backend="torch")
    per_layer = [streamed.add_layer(tq[g], tk[g], 0.3) for g in range(3)]
    loss = streamed.loss()
    # The value is the paper's mean of per-layer KLs; the gradient is that of KL(mean target || q).
    expected = torch.stack([reference_indexer_kl_loss(*index, tq[g:g + 1], tk[g:g + 1], 0.3, topk_indices=topk)
                            for g in range(3)])
    torch.testing.assert_close(torch.stack(per_layer), expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-4, atol=1e-5)
    joint = reference_indexer_kl_loss(*index, tq, tk, 0.3, topk_indices=topk)
    assert joint < loss  # the Jensen gap
    for a, b in zip(grads(loss, index), grads(joint, index)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# The dense Triton kernels at a row offset are tested in tests/test_kernels_dense.py.
@pytest.mark.parametrize("backend, sparse", [("torch", False), ("torch", True), ("triton", True)])
def test_shards_of_the_query_rows_sum_to_the_whole(backend, sparse):
    """Context parallel: each shard of query rows (here two zig-zag-like ones) against all keys, total_rows the
    whole's (in dense mode each run of positions added as a block at its position); the shards' losses and
    gradients sum to the one-shard ones."""
    index, tq, tk = make_inputs(groups=2)
    topk = random_topk(2, 37, 8) if sparse else None
    whole = IndexerKLLoss(*index, num_layers=2, topk_indices=topk, backend=backend)
    for g in range(2):
        whole.add_layer(tq[g], tk[g], 0.3)
    loss = whole.loss()
    expected = grads(loss, index)
    shards = [[(0, 9), (28, 37)], [(9, 28)]]
    total, summed = 0.0, [torch.zeros_like(t) for t in index]
    for runs in shards:
        rows = torch.cat([torch.arange(start, end) for start, end in runs])
        q, w = index[0][:, rows], index[2][:, rows]
        shard = IndexerKLLoss(q, index[1], w, num_layers=2, topk_indices=None if topk is None else topk[:, rows],
                              backend=backend, total_rows=2 * 37)
        for g in range(2):
            if sparse:  # the top-k holds the keys' positions: the shard's rows go in one block
                shard.add_layer(tq[g][:, :, rows], tk[g], 0.3)
                continue
            local_start = 0
            for start, end in runs:
                shard.add_layer(tq[g][:, :, start:end], tk[g], 0.3, query_start=local_start, query_position=start)
                local_start += end - start
        part = shard.loss()
        total = total + part.detach()
        for acc, g in zip(summed, grads(part, index)):
            acc += g
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(summed, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    if not sparse:  # a block whose rows would run past the last key
        shard = IndexerKLLoss(index[0][:, :9], index[1], index[2][:, :9], num_layers=1, total_rows=74)
        with pytest.raises(ValueError, match="query_start"):
            shard.add_layer(tq[0][:, :, 28:37], tk[0], 0.3, query_position=30)


def test_layer_by_layer_misuse():
    index, tq, tk = make_inputs()
    streamed = IndexerKLLoss(*index, num_layers=1, backend="torch")
    with pytest.raises(RuntimeError, match="0 of 1"):
        streamed.loss()
    with pytest.raises(ValueError, match="one layer"):
        streamed.add_layer(tq, tk, 0.3)
    streamed.add_layer(tq[0], tk[0], 0.3)
    with pytest.raises(RuntimeError, match="already added"):
        streamed.add_layer(tq[0], tk[0], 0.3)


def test_bad_indices_are_reported():
    index, tq, tk = make_inputs()
    topk = random_topk(2, 37, 8)
    topk[1, 5, 2] = 6
    with pytest.raises(ValueError, match=r"topk_indices\[1, 5, 2\] = 6 is outside \[-1, 5\]"):
        indexer_kl_loss(*index, tq, tk, 0.3, topk_indices=topk)
    topk[1, 5, 2] = -2
    with pytest.raises(ValueError, match="outside"):
        indexer_kl_loss(*index, tq, tk, 0.3, topk_indices=topk)
    with pytest.raises(ValueError, match="int32/int64"):
        indexer_kl_loss(*index, tq, tk, 0.3, topk_indices=topk.float())


def test_repeated_indices_are_rejected():
    """A top-k is a set: a repeated key would count twice in the torch and Triton sums."""
    index, tq, tk = make_inputs()
    topk = random_topk(2, 37, 8)
    topk[0, 20, 3] = topk[0, 20, 1]
    with pytest.raises(ValueError, match=rf"topk_indices\[0, 20\] selects key {int(topk[0, 20, 1])} more than once"):
        indexer_kl_loss(*index, tq, tk, 0.3, topk_indices=topk)
    with pytest.raises(ValueError, match="more than once"):
        IndexerKLLoss(*index, num_layers=1, topk_indices=topk)
    topk[0, 20, 3] = -1  # repeated empty slots are fine
    topk[0, 20, 1] = -1
    indexer_kl_loss(*index, tq, tk, 0.3, topk_indices=topk, backend="torch")


def test_bad_shapes_are_reported():
    index, tq, tk = make_inputs()
    with pytest.raises(ValueError, match="index_k must be"):
        indexer_kl_loss(index[0], index[1][:, :5], index[2], tq, tk, 0.3)
    with pytest.raises(ValueError, match="not a multiple"):
        indexer_kl_loss(*index, tq[:, :, :3], tk, 0.3)
    with pytest.raises(ValueError, match="do not fit"):
        indexer_kl_loss(*index, tq[..., :5, :], tk[..., :5, :], 0.3)
    with pytest.raises(ValueError, match="Unknown KL backend"):
        indexer_kl_loss(*index, tq, tk, 0.3, backend="cuda")
