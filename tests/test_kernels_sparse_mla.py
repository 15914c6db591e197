"""Sparse MLA attention in the absorbed form (`indexcache_train.kernels.sparse_mla`) against the materialising
reference: the Triton kernel (interpreter on CPU, compiled on a GPU) and the chunked torch path, the masking
rules of the indices, and the equivalence of the absorbed form with transformers' expanded MLA attention."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so set it before the kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from indexcache_train.kernels import sparse_mla_attention, sparse_mla_flops  # noqa: E402
from indexcache_train.kernels.reference import sparse_mla_attention_reference  # noqa: E402
from indexcache_train.kernels.sparse_mla import (  # noqa: E402
    _sparse_mla_torch, _sparse_mla_triton, flashmla_available, flashmla_unsupported)

CUDA = torch.cuda.is_available()
PATHS = ["torch", "triton"]
# Without a GPU the Triton path runs under the interpreter on CPU tensors; with one, the small cases run the
# compiled kernel (fp32 operands) on CUDA copies.
TRITON_DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


def random_selection(B, L, T, K, gen, *, query_start=0, pad=0.2, device="cpu", dtype=torch.int64):
    """[B, L, K] distinct keys per row as transformers' indexer gives them: the causally visible keys first
    (s <= query_start + t, in random order), then keys past the causal limit as padding, some slots -1
    (and -1 beyond T keys); slots are shuffled so that every kind sits anywhere in a row."""
    position = query_start + torch.arange(L, device=device)
    visible = torch.arange(T, device=device)[None, :] <= position[:, None]
    scores = torch.rand(B, L, T, generator=gen, device=device) + visible
    idx = scores.topk(min(K, T), dim=-1).indices
    if K > T:
        idx = torch.cat([idx, idx.new_full((B, L, K - T), -1)], dim=-1)
    idx = idx.masked_fill(torch.rand(B, L, K, generator=gen, device=device) < pad, -1)
    perm = torch.rand(B, L, K, generator=gen, device=device).argsort(-1)
    return idx.gather(-1, perm).to(dtype)


def make_inputs(B, L, T, H, D, K, *, query_start=0, seed=0, dtype=torch.float32, device="cpu",
                idx_dtype=torch.int64):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=gen, device=device).to(dtype)
    kv = torch.randn(B, T, D, generator=gen, device=device).to(dtype)
    idx = random_selection(B, L, T, K, gen, query_start=query_start, device=device, dtype=idx_dtype)
    return q, kv, idx, D ** -0.5


def run(path, q, kv, idx, scale, value_dim, query_start=0):
    """The public function on the path's device; results come back to q's device."""
    home = q.device
    if path == "triton":
        q, kv, idx = (x.to(TRITON_DEVICE) for x in (q, kv, idx))
    out, lse = sparse_mla_attention(q, kv, idx, scale, value_dim=value_dim, query_start=query_start,
                                    backend=path, return_lse=True)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    return out.to(home), lse.to(home)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_matches(out, lse, ref_out, ref_lse, tol):
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) < tol, rel_err(out, ref_out)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    assert rel_err(lse[finite], ref_lse[finite]) < tol


# (B, L, T, H, D, value_dim, K, query_start): K below, above and not a multiple of the interpreter's BK = 16,
# K > T (-1 padding), H < 16 and odd, H > 64 (two head blocks, the second one padded), value_dim == D (no
# rope tail), non-power-of-2 value and tail dims, a chunk of queries in the middle of the sequence.
CASES = {
    "small_B2": (2, 13, 13, 4, 24, 16, 20, 0),
    "odd_dims": (2, 11, 11, 3, 44, 20, 7, 0),
    "two_head_blocks_mid": (1, 9, 40, 80, 40, 32, 37, 31),
    "no_tail_mid": (1, 10, 25, 20, 32, 32, 19, 8),
    "K_gt_T_mid": (2, 8, 30, 6, 40, 32, 50, 12),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(path, case):
    B, L, T, H, D, value_dim, K, query_start = CASES[case]
    q, kv, idx, scale = make_inputs(B, L, T, H, D, K, query_start=query_start, seed=len(case),
                                    idx_dtype=torch.int32 if "mid" in case else torch.int64)
    ref_out, ref_lse = sparse_mla_attention_reference(q.double(), kv.double(), idx, scale, value_dim, query_start)
    out, lse = run(path, q, kv, idx, scale, value_dim, query_start)
    assert_matches(out, lse, ref_out, ref_lse, 1e-4)


@pytest.mark.parametrize("ratio", [0, 1000])  # gather the selected keys / score every key and gather scores
@pytest.mark.parametrize("case", ["small_B2", "two_head_blocks_mid", "K_gt_T_mid"])
def test_both_torch_formulations_match_the_reference(case, ratio, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("indexcache_train.kernels.sparse_mla"), "_DENSE_SCORING_RATIO", ratio)
    B, L, T, H, D, value_dim, K, query_start = CASES[case]
    q, kv, idx, scale = make_inputs(B, L, T, H, D, K, query_start=query_start, seed=7)
    ref_out, ref_lse = sparse_mla_attention_reference(q.double(), kv.double(), idx, scale, value_dim, query_start)
    out, lse = run("torch", q, kv, idx, scale, value_dim, query_start)
    assert_matches(out, lse, ref_out, ref_lse, 1e-4)


def _selection_with_empty_rows():
    B, L, T, H, D, value_dim, K = 2, 7, 7, 5, 24, 16, 9
    q, kv, idx, scale = make_inputs(B, L, T, H, D, K, seed=3)
    idx[0, 3] = -1  # only padding
    idx[1, 2] = torch.tensor([-1, 5, 6, -1, 3, 4, -1, 6, 5])  # only keys past the causal limit t = 2
    idx[1, 0] = -1
    idx[1, 0, 7] = 0  # a single key, late in the row
    return q, kv, idx, scale, value_dim


@pytest.mark.parametrize("path", PATHS)
def test_empty_and_single_key_rows(path):
    """A row with no valid slot gives out = 0 and lse = -inf; a row with one key copies its value."""
    q, kv, idx, scale, value_dim = _selection_with_empty_rows()
    ref_out, ref_lse = sparse_mla_attention_reference(q.double(), kv.double(), idx, scale, value_dim)
    out, lse = run(path, q, kv, idx, scale, value_dim)
    assert_matches(out, lse, ref_out, ref_lse, 1e-4)
    for r in ((0, 3), (1, 2)):
        assert (out[r] == 0).all() and (lse[r] == float("-inf")).all()
    torch.testing.assert_close(out[1, 0], kv[1, 0, :value_dim].expand_as(out[1, 0]))
    torch.testing.assert_close(lse[1, 0], scale * q[1, 0] @ kv[1, 0])

    out, lse = run(path, q, kv, torch.full_like(idx, -1), scale, value_dim)
    assert (out == 0).all() and (lse == float("-inf")).all()
    out, lse = run(path, q, kv, idx[..., :0], scale, value_dim)  # K = 0
    assert out.shape == (*q.shape[:3], value_dim) and (out == 0).all() and (lse == float("-inf")).all()


def test_kernel_writes_every_output():
    """NaN-poisoned buffers: the kernel writes every element, padded head blocks and empty rows included."""
    q, kv, idx, scale, value_dim = _selection_with_empty_rows()
    q, kv, idx = (x.to(TRITON_DEVICE) for x in (q, kv, idx))
    out = torch.full((*q.shape[:3], value_dim), float("nan"), device=q.device)
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    _sparse_mla_triton(q, kv, idx, scale, value_dim, out=out, lse=lse)
    ref_out, ref_lse = sparse_mla_attention_reference(q.double(), kv.double(), idx, scale, value_dim)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_matches(out, lse, ref_out, ref_lse, 1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_inputs(path):
    """q sliced along L, kv sliced from wider rows and indices with a slot stride give the contiguous result."""
    B, L, T, H, D, value_dim, K, query_start = 2, 6, 20, 4, 40, 32, 11, 9
    q, kv, idx, scale = make_inputs(B, L + 5, T, H, D, K, query_start=query_start - 2, seed=7)
    ref_out, ref_lse = sparse_mla_attention_reference(q[:, 2:2 + L].double(), kv.double(), idx[:, 2:2 + L],
                                                      scale, value_dim, query_start)
    kv_wide = torch.randn(B, T, D + 8)
    kv_wide[..., :D] = kv
    idx_wide = torch.full((B, L, 2 * K), -1)
    idx_wide[..., ::2] = idx[:, 2:2 + L]
    q_view, kv_view, idx_view = q[:, 2:2 + L], kv_wide[..., :D], idx_wide[..., ::2]
    assert not q_view.is_contiguous() and not kv_view.is_contiguous() and not idx_view.is_contiguous()
    out, lse = run(path, q_view, kv_view, idx_view, scale, value_dim, query_start)
    assert_matches(out, lse, ref_out, ref_lse, 1e-4)


def test_triton_matches_torch_path():
    """Both implementations agree on one larger case with two head blocks and many invalid slots."""
    B, L, T, H, D, value_dim, K, query_start = 1, 16, 48, 72, 48, 32, 40, 32
    q, kv, idx, scale = make_inputs(B, L, T, H, D, K, query_start=query_start, seed=17)
    t_out, t_lse = run("triton", q, kv, idx, scale, value_dim, query_start)
    p_out, p_lse = run("torch", q, kv, idx, scale, value_dim, query_start)
    assert_matches(t_out, t_lse, p_out, p_lse, 1e-5)


@pytest.mark.parametrize("split", [0, 1])
def test_score_formulations(split):
    """Both score formulations of the kernel (SPLIT = 0: the plain chained dots; 1: the scores computed inside a
    branch, the GPU's large-head default) give the reference, two head blocks and invalid slots included."""
    B, L, T, H, D, value_dim, K, query_start = CASES["two_head_blocks_mid"]
    q, kv, idx, scale = make_inputs(B, L, T, H, D, K, query_start=query_start, seed=11)
    ref_out, ref_lse = sparse_mla_attention_reference(q.double(), kv.double(), idx, scale, value_dim, query_start)
    q, kv, idx = (x.to(TRITON_DEVICE) for x in (q, kv, idx))
    out, lse = _sparse_mla_triton(q, kv, idx, scale, value_dim, query_start, config=(16, 4, 1, split))
    assert_matches(out.cpu(), lse.cpu(), ref_out, ref_lse, 1e-4)


def test_mla_equivalence():
    """The absorbed form is transformers' MLA: with k_h = [W_K[h] c ; k_R] and v_h = W_V[h] c (kv_b_proj's
    weight viewed as [H, dn + dv, r]), softmax attention of q_h = [q_N ; q_R] over the selected keys equals
    W_V[h] applied to the absorbed output of q_abs = [W_K[h]^T q_N ; q_R] against kv = [c ; k_R]."""
    B, L, H, r, dr, dn, dv, K = 2, 10, 4, 32, 16, 24, 20, 6
    gen = torch.Generator().manual_seed(21)
    c, k_rope = torch.randn(B, L, r, generator=gen), torch.randn(B, L, dr, generator=gen)
    q_nope, q_rope = torch.randn(B, L, H, dn, generator=gen), torch.randn(B, L, H, dr, generator=gen)
    w_kv = torch.randn(H * (dn + dv), r, generator=gen) * r ** -0.5  # kv_b_proj.weight
    w_k, w_v = w_kv.view(H, dn + dv, r).split([dn, dv], dim=1)  # [H, dn, r], [H, dv, r]
    idx = random_selection(B, L, L, K, gen)
    scale = (dn + dr) ** -0.5

    # Expanded (transformers' eager path): per-head keys and values, the selection as a mask.
    keys = torch.cat([torch.einsum("hnr,btr->bhtn", w_k, c), k_rope[:, None].expand(-1, H, -1, -1)], dim=-1)
    values = torch.einsum("hvr,btr->bhtv", w_v, c)
    query = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, L, dn + dr]
    allowed = torch.zeros(B, L, L + 1, dtype=torch.bool).scatter_(-1, torch.where(idx >= 0, idx, L), True)
    allowed = allowed[..., :L] & torch.ones(L, L, dtype=torch.bool).tril()
    scores = (query @ keys.transpose(-1, -2) * scale).masked_fill(~allowed[:, None], float("-inf"))
    expected = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2)  # [B, L, H, dv]

    q_abs = torch.cat([torch.einsum("hnr,blhn->blhr", w_k, q_nope), q_rope], dim=-1)
    kv = torch.cat([c, k_rope], dim=-1)
    for path in PATHS:
        latent, _ = run(path, q_abs, kv, idx, scale, r)
        torch.testing.assert_close(torch.einsum("hvr,blhr->blhv", w_v, latent), expected, rtol=1e-4, atol=1e-5)


def test_torch_path_gradients():
    """The torch path is differentiable (CPU training); its gradients are the reference's."""
    B, L, T, H, D, value_dim, K, query_start = 2, 7, 10, 3, 20, 12, 6, 3
    q, kv, idx, scale = make_inputs(B, L, T, H, D, K, query_start=query_start, seed=5, dtype=torch.float64)
    idx[0, 1] = -1  # an empty row must not turn the gradients into NaN
    grads = []
    for fn in (_sparse_mla_torch, sparse_mla_attention_reference):
        qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()
        out, lse = fn(qg, kvg, idx, scale, value_dim, query_start)
        (out.pow(2).sum() + lse.double().clamp_min(-10).sum()).backward()
        grads.append((qg.grad, kvg.grad))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_backend_choice_and_validation(monkeypatch):
    q, kv, idx, scale = make_inputs(1, 4, 4, 2, 16, 3)
    default = sparse_mla_attention(q, kv, idx, scale, value_dim=8)  # CPU: the torch path
    torch.testing.assert_close(default, _sparse_mla_torch(q, kv, idx, scale, 8)[0])
    with pytest.raises(ValueError, match="Unknown"):
        sparse_mla_attention(q, kv, idx, scale, value_dim=8, backend="cuda")
    with pytest.raises(ValueError, match="forward-only"):
        sparse_mla_attention(q.to(TRITON_DEVICE).requires_grad_(), kv.to(TRITON_DEVICE), idx.to(TRITON_DEVICE),
                             scale, value_dim=8, backend="triton")
    with pytest.raises(ValueError, match="backend='flashmla' cannot run this call"):
        sparse_mla_attention(q, kv, idx, scale, value_dim=8, backend="flashmla")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sparse_mla_attention(q, kv, idx, scale, value_dim=8, backend="triton")

    bad = {  # a fragment of each message
        "Expected q": [dict(q=q[0]), dict(kv=kv[0]), dict(indices=idx[0])],
        "must be \\[B=1, T, D=16\\]": [dict(kv=kv[..., :8]), dict(kv=torch.cat([kv, kv]))],
        "must be \\[B=1, L=4, K\\]": [dict(indices=idx[:, :2])],
        "T = 0": [dict(kv=kv[:, :0])],
        "int32 or int64": [dict(indices=idx.float())],
        "floating dtype": [dict(kv=kv.double()), dict(q=q.long(), kv=kv.long())],
        "value_dim must be": [dict(value_dim=17), dict(value_dim=0)],
        "query_start": [dict(query_start=-1)],
    }
    for message, overrides in bad.items():
        for override in overrides:
            with pytest.raises(ValueError, match=message):
                sparse_mla_attention(**(dict(q=q, kv=kv, indices=idx, scale=scale, value_dim=8) | override))


def test_flops():
    assert sparse_mla_flops(1, 65536, 128, 576, 512, 2048) == 2 * 65536 * 128 * 2048 * (576 + 512)


# --------------------------------------------------------------------------------------------------- GPU ---
GPU_CASES = {
    # DeepSeek V3.2 / GLM-5 absorbed MLA: 128 heads, 512 + 64 latent key, top-2048.
    "dsa_prefill": (1, 4096, 4096, 128, 576, 512, 2048, 0),
    # The CPU-trained small model's shape, batch 2, a chunk of queries in the middle of the sequence.
    "small_model_mid": (2, 512, 1024, 8, 80, 64, 128, 256),
    # 64 heads, batch 2: FlashMLA's loop over sequences and its stacked outputs.
    "batch2_64_heads_mid": (2, 512, 1024, 64, 576, 512, 128, 256),
}


def test_flashmla_takes_only_its_shapes():
    q, kv, idx, _ = make_inputs(1, 4, 4, 2, 16, 3)
    reason = flashmla_unsupported(q, idx, 8)
    assert reason is not None and ("not installed" in reason if not flashmla_available() else "Hopper" in reason)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "flashmla"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_bf16(case, backend):
    B, L, T, H, D, value_dim, K, query_start = GPU_CASES[case]
    q, kv, idx, scale = make_inputs(B, L, T, H, D, K, query_start=query_start, seed=1, dtype=torch.bfloat16,
                                    device="cuda", idx_dtype=torch.int32)
    if backend == "flashmla" and flashmla_unsupported(q, idx, value_dim):
        pytest.skip(flashmla_unsupported(q, idx, value_dim))
    with torch.no_grad():
        out, lse = sparse_mla_attention(q, kv, idx, scale, value_dim=value_dim, query_start=query_start,
                                        backend=backend, return_lse=True)
        ref_out, ref_lse = _sparse_mla_torch(q.float(), kv.float(), idx, scale, value_dim, query_start)
    assert out.dtype == torch.bfloat16
    assert_matches(out, lse, ref_out, ref_lse, 1e-2)
