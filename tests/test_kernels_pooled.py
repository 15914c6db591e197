"""The pooled indexer's KL (`kernels/pooled.py`): pool keys broadcast to their tokens, the token kernels on the
candidate support, against the materialising pool-level reference: the gradients of q, the pool keys and w
are equal, and the value exceeds the pooled KL by the reference's teacher-only term. Dense and sparse, Triton
(TRITON_INTERPRET=1 on CPU) and torch."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from indexcache_train.kernels import IndexerKLLoss, indexer_kl_loss  # noqa: E402
from indexcache_train.kernels.pooled import pool_candidates, pool_to_tokens, visible_limit  # noqa: E402
from indexcache_train.kernels.reference import reference_pooled_indexer_kl_loss  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The exact fp64 cases run Triton under the interpreter; on CUDA it runs in the bf16 cases at the end.
BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])
POOL = 4
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="native Triton on CUDA")


def make_inputs(B=2, L=45, Hi=2, Di=16, G=2, H=4, Hk=2, D=16, seed=0, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    pools = L // POOL
    return dict(index_q=rand(B, L, Hi, Di, scale=2.0 * Di ** -0.5), pool_keys=rand(B, pools, Di),
                index_w=rand(B, L, Hi, scale=Hi ** -0.5), teacher_q=rand(G, B, H, L, D, scale=1.5),
                teacher_k=rand(G, B, Hk, L, D), scale=D ** -0.5)


def pooled_selection(B, L, kept_pools, seed=0):
    """A selection as the native indexer writes it: up to `kept_pools` random complete pools per row,
    expanded to tokens, then the visible tail, then -1 padding."""
    gen = torch.Generator().manual_seed(seed)
    width = kept_pools * POOL + POOL - 1
    out = torch.full((B, L, width), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(L):
            complete = (t + 1) // POOL
            chosen = torch.randperm(complete, generator=gen)[:kept_pools].sort().values
            tokens = (chosen[:, None] * POOL + torch.arange(POOL)).flatten().tolist()
            tail = list(range(complete * POOL, t + 1))
            row = tokens + tail
            out[b, t, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def leaves(inputs):
    return [inputs[k].clone().requires_grad_() for k in ("index_q", "pool_keys", "index_w")]


def fused(inputs, backend, topk=None):
    q, pool_keys, w = leaves(inputs)
    keys = pool_to_tokens(pool_keys, POOL, q.shape[1])
    loss = indexer_kl_loss(q, keys, w, inputs["teacher_q"], inputs["teacher_k"], inputs["scale"],
                           topk_indices=topk, backend=backend, pool_size=POOL)
    loss.backward()
    return loss.detach(), [x.grad for x in (q, pool_keys, w)]


def reference(inputs, topk=None):
    q, pool_keys, w = leaves(inputs)
    kl, teacher_term = reference_pooled_indexer_kl_loss(q, pool_keys, w, inputs["teacher_q"], inputs["teacher_k"],
                                                        inputs["scale"], pool_size=POOL, topk_indices=topk)
    kl.backward()
    return kl.detach(), teacher_term, [x.grad for x in (q, pool_keys, w)]


def test_visible_limit_and_candidates():
    rows = torch.arange(10)
    assert visible_limit(rows, POOL).tolist() == [-1, -1, -1, 3, 3, 3, 3, 7, 7, 7]
    assert torch.equal(visible_limit(rows, 1), rows)
    selection = torch.full((1, 10, 7), -1, dtype=torch.int32)
    selection[0, 2, :3] = torch.tensor([0, 1, 2])  # no complete pool yet: all tail
    selection[0, 9, :6] = torch.tensor([4, 5, 6, 7, 8, 9])  # pool 1, then the tail 8, 9
    kept = pool_candidates(selection, POOL)
    assert (kept[0, 2] == -1).all() and kept[0, 9].tolist() == [4, 5, 6, 7, -1, -1, -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_equals_the_pooled_reference(backend):
    inputs = make_inputs()
    value, grads = fused(inputs, backend)
    ref_kl, teacher_term, ref_grads = reference(inputs)
    assert ref_kl > 0.05 and teacher_term > 0.01  # both terms are really there
    torch.testing.assert_close(value.double(), ref_kl + teacher_term, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_equals_the_pooled_reference_without_the_tail(backend):
    inputs = make_inputs(seed=1)
    B, L = inputs["index_q"].shape[:2]
    topk = pooled_selection(B, L, kept_pools=3)
    value, grads = fused(inputs, backend, topk)
    ref_kl, teacher_term, ref_grads = reference(inputs, topk)
    torch.testing.assert_close(value.double(), ref_kl + teacher_term, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the tail is left out: with it, the sparse KL is another one
    tokens = pool_to_tokens(inputs["pool_keys"], POOL, L)
    with_tail = indexer_kl_loss(inputs["index_q"], tokens, inputs["index_w"], inputs["teacher_q"],
                                inputs["teacher_k"], inputs["scale"], topk_indices=topk, backend="torch")
    assert not torch.allclose(with_tail.double(), value.double(), rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_by_layer_form_matches_the_group_form(backend):
    """IndexerKLLoss(pool_size=) streams served layers; its gradients are the group mean's (loss linear in p)."""
    inputs = make_inputs(seed=2)
    q, pool_keys, w = leaves(inputs)
    kl = IndexerKLLoss(q, pool_to_tokens(pool_keys, POOL, q.shape[1]), w, num_layers=2, backend=backend,
                       pool_size=POOL)
    for g in range(2):
        kl.add_layer(inputs["teacher_q"][g], inputs["teacher_k"][g], inputs["scale"])
    kl.loss().backward()
    _, _, ref_grads = reference(inputs)
    for got, want in zip((q.grad, pool_keys.grad, w.grad), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_bad_pool_sizes_are_refused():
    inputs = make_inputs(L=16)
    keys = pool_to_tokens(inputs["pool_keys"], POOL, 16)
    with pytest.raises(ValueError, match="pool_size must be a positive integer"):
        indexer_kl_loss(inputs["index_q"], keys, inputs["index_w"], inputs["teacher_q"], inputs["teacher_k"],
                        inputs["scale"], pool_size=0)
    with pytest.raises(ValueError, match="do not fit"):
        pool_to_tokens(inputs["pool_keys"], POOL, 15)


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@gpu
@needs_cuda
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_gpu_bf16_matches_the_pooled_reference(stage):
    """GLM-5.3-Flash-like tiles in bf16 on CUDA (index heads 16 x 128, an expanded 16-head teacher of dim
    192, two served layers, L = 1024 in pools of 4), against the fp64 reference on the same bf16 values."""
    inputs = make_inputs(B=1, L=1024, Hi=16, Di=128, G=2, H=16, Hk=16, D=192, seed=5, dtype=torch.bfloat16,
                         device="cuda")
    topk = pooled_selection(1, 1024, kept_pools=32).cuda() if stage == "sparse" else None
    value, grads = fused(inputs, "triton", topk)
    exact = {k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    ref_kl, teacher_term, ref_grads = reference(exact, topk)
    assert abs(value.item() - (ref_kl + teacher_term).item()) < 1e-2 * (ref_kl + teacher_term).item()
    for got, want, name in zip(grads, ref_grads, ("d_index_q", "d_pool_keys", "d_index_w")):
        assert relative_error(got, want) < 2e-2, name
