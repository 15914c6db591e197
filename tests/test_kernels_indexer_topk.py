"""The fused indexer selection (`indexcache_train.kernels.indexer_topk`): its logits against a materialising
reference for the Triton kernel (interpreter on CPU, compiled on a GPU) and the torch path, and its top-k
against transformers' native indexers (GLM-MoE-DSA, DeepSeek-V3.2, the embedded model)."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so set it before the kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import build_tiny  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from indexcache_train.adapters import get_adapter  # noqa: E402
from indexcache_train.config import EMBEDDED_MODEL_DIR  # noqa: E402
from indexcache_train.kernels import indexer_logits, indexer_logits_flops, indexer_topk  # noqa: E402
# The package's `indexer_topk` is the function; the module's internals come from the module itself.
from indexcache_train.kernels.indexer_topk import GPU_CONFIGS, _logits_triton, default_chunk_rows  # noqa: E402

CUDA = torch.cuda.is_available()
PATHS = ["torch", "triton"]
# Without a GPU the Triton path runs under the interpreter on CPU tensors; with one, on CUDA copies.
TRITON_DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


def make_inputs(B, C, T, Hi, Di, *, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    return randn(B, C, Hi, Di, std=Di ** -0.5), randn(B, T, Di, std=1.0), randn(B, C, Hi, std=Hi ** -0.5)


def reference_logits(index_q, index_k, index_weights, query_start=0):
    """The native maths, materialised in float64: [B, C, Hi, T] head scores, weighted, summed, masked."""
    scores = torch.einsum("bchd,btd->bcht", index_q.double(), index_k.double()).relu()
    logits = torch.einsum("bch,bcht->bct", index_weights.double(), scores)
    C, T = logits.shape[1:]
    position = query_start + torch.arange(C, device=logits.device)
    return logits.masked_fill(torch.arange(T, device=logits.device) > position[:, None], float("-inf"))


def on_path(path, *tensors):
    return [t.to(TRITON_DEVICE) for t in tensors] if path == "triton" else list(tensors)


def selected_mask(selection, num_keys, positions):
    """[B, L, T] bool: the keys a selection holds among those visible (s <= position); -1 slots hold none."""
    B, L, _ = selection.shape
    mask = torch.zeros(B, L, num_keys + 1, dtype=torch.bool, device=selection.device)
    mask.scatter_(-1, selection.long().where(selection >= 0, num_keys), True)
    visible = torch.arange(num_keys, device=selection.device) <= positions[:, None]
    return mask[..., :num_keys] & visible


def overlap(ours, native, num_keys, query_start=0, native_scores=None):
    """Share of the native selection's visible keys that ours selects too, after checking that ours selects
    exactly as many keys per row (min(k, t + 1)) and only visible ones. With `native_scores` (what the native
    top-k ranked), a key ours selects in place of one of equal native score counts as agreeing: such ties are
    real (a key whose every head relu is 0 scores exactly 0) and torch.topk breaks them arbitrarily."""
    positions = query_start + torch.arange(ours.shape[1], device=ours.device)
    ref, got = selected_mask(native, num_keys, positions), selected_mask(ours, num_keys, positions)
    assert torch.equal((ours >= 0).sum(-1), ref.sum(-1)), "ours keeps a different number of keys"
    assert torch.equal(got.sum(-1), (ours >= 0).sum(-1)), "ours selects a masked key or a key twice"
    agree = (ref & got).sum()
    if native_scores is not None:
        lowest = native_scores.masked_fill(~ref, float("inf")).amin(-1, keepdim=True)
        agree = agree + (got & ~ref & (native_scores == lowest)).sum()
    return (agree / ref.sum()).item()


def assert_valid_topk(selection, logits, k):
    """A correct top-k up to ties: its keys' logits are the k largest of each row, -1 exactly where the row
    has fewer than k visible keys."""
    visible = torch.isfinite(logits).sum(-1)
    assert selection.dtype == torch.int32 and selection.shape == (*logits.shape[:2], k)
    assert torch.equal((selection >= 0).sum(-1), visible.clamp_max(k))
    gathered = logits.gather(-1, selection.long().clamp_min(0)).masked_fill(selection < 0, float("-inf"))
    torch.testing.assert_close(gathered.sort(-1, descending=True).values, logits.topk(k, dim=-1).values,
                               rtol=1e-5, atol=1e-6)


# (B, C, T, Hi, Di, query_start): tiles split unevenly (the interpreter's tile is 32 x 32), T and C not
# multiples of it, odd head counts and head dims, a block of queries in the middle of a longer sequence.
LOGIT_CASES = {
    "square": (1, 70, 70, 4, 32, 0),
    "odd_dims": (1, 37, 37, 3, 24, 0),
    "batch_offset": (2, 40, 100, 5, 16, 60),
    "decode_rows": (2, 3, 45, 2, 16, 42),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(LOGIT_CASES))
def test_logits_match_reference(path, case):
    B, C, T, Hi, Di, query_start = LOGIT_CASES[case]
    inputs = make_inputs(B, C, T, Hi, Di, seed=len(case))
    logits = indexer_logits(*on_path(path, *inputs), query_start=query_start, backend=path)
    assert logits.dtype == torch.float32 and logits.shape == (B, C, T)
    torch.testing.assert_close(logits.cpu().double(), reference_logits(*inputs, query_start), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_triton_gpu_tiles_and_strided_inputs(config):
    """The GPU's tile shapes, which the interpreter otherwise never runs, on strided inputs."""
    q, k, w = make_inputs(1, 150, 300, 3, 16, seed=5)
    q_wide = torch.zeros(1, 150, 4, 16)
    q_wide[:, :, :3] = q  # a row stride that is not Hi * Di
    ref = reference_logits(q, k, w, 150)
    q_wide, k, w = on_path("triton", q_wide, k, w)
    logits = _logits_triton(q_wide[:, :, :3], k, w, 150, config=config)
    torch.testing.assert_close(logits.cpu().double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_no_query_rows(path):
    q, k, w = on_path(path, *make_inputs(2, 0, 5, 3, 16))
    assert indexer_logits(q, k, w, query_start=5, backend=path).shape == (2, 0, 5)
    assert indexer_topk(q, k, w, 4, query_start=5, backend=path).shape == (2, 0, 4)


def test_bf16_inputs_on_the_torch_path():
    q, k, w = make_inputs(2, 33, 50, 4, 16, seed=2, dtype=torch.bfloat16)
    logits = indexer_logits(q, k, w, query_start=17, backend="torch")
    torch.testing.assert_close(logits.double(), reference_logits(q, k, w, 17), rtol=1e-5, atol=1e-6)
    selection = indexer_topk(q, k, w, 8, query_start=17, chunk_rows=10, backend="torch")
    assert_valid_topk(selection, logits, 8)


# (B, L, T, Hi, Di, topk, query_start, chunk_rows): k < T with chunks that do not divide L, k > L (rows keep
# -1 slots; k is capped at T), and a block of queries after a prefix.
TOPK_CASES = {
    "chunked": (1, 50, 50, 3, 16, 8, 0, 16),
    "short": (2, 20, 20, 4, 16, 32, 0, 7),
    "after_prefix": (2, 30, 70, 5, 16, 48, 40, None),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_topk_is_the_topk_of_the_logits(path, case):
    B, L, T, Hi, Di, topk, query_start, chunk_rows = TOPK_CASES[case]
    inputs = make_inputs(B, L, T, Hi, Di, seed=len(case))
    selection = indexer_topk(*on_path(path, *inputs), topk, query_start=query_start, chunk_rows=chunk_rows,
                             backend=path)
    assert_valid_topk(selection.cpu(), reference_logits(*inputs, query_start).float(), min(topk, T))
    if case == "short":  # every key is kept: row t holds 0..t once, then -1 slots
        t = torch.arange(L)
        expected = torch.where(t[None, :] <= t[:, None], t[None, :], -1).sort(-1).values
        assert torch.equal(selection.cpu().sort(-1).values, expected.int().expand(B, L, L))


def test_torch_path_holds_one_block():
    """The largest tensor the torch path allocates is the fp32 [B, chunk, T] block (32 MiB here): the per-row-
    block head scores stay within their 32 MiB budget, and nothing is [chunk, Hi, T]."""
    L, chunk = 4096, 2048
    inputs = make_inputs(1, L, L, 8, 16, seed=0)

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for ret, value in zip(func._schema.returns, out if isinstance(out, tuple) else (out,)):
                if ret.alias_info is None and isinstance(value, torch.Tensor):
                    self.largest = max(self.largest, value.nbytes)
            return out

    with Largest() as recorder:
        indexer_topk(*inputs, 64, chunk_rows=chunk, backend="torch")
    assert recorder.largest == chunk * L * 4


def test_default_chunk_rows():
    assert default_chunk_rows(1, 65536, torch.device("cuda")) == 4096  # 1 GiB fp32 block
    assert default_chunk_rows(2, 200_000, torch.device("cuda")) == 640
    assert default_chunk_rows(1, 32768, torch.device("cpu")) == 2048  # 256 MiB
    assert default_chunk_rows(1, 1 << 30, torch.device("cpu")) == 1


def test_flops():
    B, L, Hi, Di = 2, 9, 3, 4
    pairs = torch.ones(L, L).tril()
    assert indexer_logits_flops(B, L, Hi, Di) == 2 * Hi * Di * B * int(pairs.sum()) == 2 * Hi * Di * B * 45
    assert indexer_logits_flops(B, L, Hi, Di, query_start=4, C=3) == 2 * Hi * Di * B * int(pairs[4:7].sum())
    assert indexer_logits_flops(B, L, Hi, Di, query_start=4) == 2 * Hi * Di * B * int(pairs[4:].sum())


def test_rejects_bad_inputs(monkeypatch):
    q, k, w = make_inputs(1, 6, 6, 2, 16)
    bad = {
        "Expected index_q": (q[0], k, w),
        "index_k must be": (q, k[..., :8], w),
        "index_weights": (q, k, w[..., :1]),
        "floating-point": (q, k.int(), w),
        "is on meta": (q, k.to("meta"), w),
        "Empty inputs": (q[:, :, :0], k, w[..., :0]),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            indexer_logits(*args)
    for query_start in (-1, 1, 2.0):
        with pytest.raises(ValueError, match="query_start"):
            indexer_topk(q, k, w, 4, query_start=query_start)
    for topk in (0, 2.5):
        with pytest.raises(ValueError, match="topk"):
            indexer_topk(q, k, w, topk)
    with pytest.raises(ValueError, match="chunk_rows"):
        indexer_topk(q, k, w, 4, chunk_rows=0)
    with pytest.raises(ValueError, match="Unknown"):
        indexer_logits(q, k, w, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        indexer_topk(q, k, w, 4, backend="triton")


# ---------------------------------------------------------------------------------------- native top-k ---
class RankedScores(TorchDispatchMode):
    """Records the scores every top-k ranks: for a native indexer, its fp32 [B, L, T] scores, mask included."""

    def __init__(self):
        super().__init__()
        self.ranked = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.topk.default:
            self.ranked.append(args[0])
        return func(*args, **(kwargs or {}))


def native_calls(model, input_ids):
    """Every indexer's inputs and native top-k in one forward (no cache, so k is this sequence's own)."""
    adapter, calls = get_adapter(model), []
    hooks = [adapter.indexer(model, layer).register_forward_hook(
        lambda indexer, args, kwargs, output: calls.append((indexer, args, kwargs, output)), with_kwargs=True)
        for layer in range(adapter.num_layers(model)) if adapter.indexer(model, layer) is not None]
    with torch.no_grad():
        model(input_ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return calls


def native_overlaps(model, calls, backend, chunk_rows):
    """(set overlap, overlap up to ties) of `indexer_topk` with the native top-k, for each native call."""
    adapter, overlaps = get_adapter(model), []
    for indexer, args, kwargs, native in calls:
        with torch.no_grad(), RankedScores() as recorder:
            assert torch.equal(indexer(*args, **kwargs), native)
            proj = adapter.indexer_projections(indexer, *args[:3])
        ours = indexer_topk(*on_path(backend, proj.query, proj.key, proj.weights), indexer.index_topk,
                            chunk_rows=chunk_rows, backend=backend).cpu()
        (scores,) = recorder.ranked
        num_keys = native.shape[1]
        overlaps.append((overlap(ours, native, num_keys), overlap(ours, native, num_keys, native_scores=scores)))
    return overlaps


@pytest.mark.parametrize("path", PATHS)
def test_matches_native_tiny_models(model_type, path):
    """Up to ties, the native selection exactly; as sets, >= 99.8% (the rest are keys tied at a score of 0)."""
    model = build_tiny(model_type, index_topk=16)
    input_ids = torch.randint(0, 257, (2, 96), generator=torch.Generator().manual_seed(3))
    overlaps = native_overlaps(model, native_calls(model, input_ids), path, chunk_rows=40)
    print(model_type, path, overlaps)
    assert len(overlaps) == 4
    assert min(tied for _, tied in overlaps) >= 0.999 and min(raw for raw, _ in overlaps) >= 0.99


@pytest.mark.slow
def test_matches_native_embedded_model():
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()
    input_ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    calls = native_calls(model, input_ids)
    # The interpreter takes ~8 s a layer here; the tiny models above cover it, so it runs on a GPU only.
    for path in PATHS if TRITON_DEVICE == "cuda" else ["torch"]:
        overlaps = native_overlaps(model, calls, path, chunk_rows=384)
        print("embedded", path, overlaps)
        assert len(overlaps) == 8 and min(min(pair) for pair in overlaps) >= 0.999


# --------------------------------------------------------------------------------------------------- GPU ---
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_bf16_overlap():
    B, L, Hi, Di, topk = 1, 8192, 64, 128, 2048
    q, k, w = make_inputs(B, L, L, Hi, Di, seed=1, dtype=torch.bfloat16, device="cuda")
    ours = indexer_topk(q, k, w, topk, chunk_rows=2048)
    reference = indexer_topk(q.float(), k.float(), w.float(), topk, chunk_rows=2048, backend="torch")
    assert overlap(ours, reference, L) >= 0.999
    # Every offered tile computes the same logits (a block in the middle of the sequence).
    rows = slice(3000, 3000 + 1000)
    expected = indexer_logits(q[:, rows].float(), k.float(), w[:, rows].float(), query_start=3000, backend="torch")
    for config in GPU_CONFIGS:
        logits = _logits_triton(q[:, rows], k, w[:, rows], 3000, config=config)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
