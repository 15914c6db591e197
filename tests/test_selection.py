"""`use_chunked_selection`: the native indexer's top-k, computed a block of queries at a time."""

import pytest
import torch
from conftest import build_tiny
from torch.utils._python_dispatch import TorchDispatchMode

from indexcache_train.adapters import apply_indexcache, get_adapter, use_chunked_selection

CHUNK = 16
SEQ_LEN = 50  # over three chunks and a partial one


class OpRecorder(TorchDispatchMode):
    """Records the largest tensor any op allocates (views and in-place results are not allocations) and the
    scores every top-k ranks."""

    def __init__(self):
        super().__init__()
        self.largest, self.ranked = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.topk.default:
            self.ranked.append(args[0])
        for ret, value in zip(func._schema.returns, out if isinstance(out, tuple) else (out,)):
            if ret.alias_info is None and isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.nbytes)
        return out


def padded_batch():
    input_ids = torch.randint(0, 257, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :7] = 0  # left padding: the mask is more than causal
    return input_ids, attention_mask


def logits(model, input_ids, attention_mask, **kwargs):
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask, **kwargs).logits


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])  # bool mask, additive mask
def test_chunked_topk_selects_the_native_set(model_type, attn_implementation):
    model = build_tiny(model_type)
    model.set_attn_implementation(attn_implementation)
    adapter = get_adapter(model)
    indexer = adapter.indexer(model, 2)
    seen = {}
    handle = indexer.register_forward_hook(lambda module, args, output: seen.update(args=args))
    logits(model, *padded_batch(), use_cache=False)
    handle.remove()
    mask = seen["args"][3]
    assert mask.dtype == (torch.bool if attn_implementation == "sdpa" else torch.float32)
    with torch.no_grad(), OpRecorder() as recorder:
        native = indexer(*seen["args"])
    (native_scores,) = recorder.ranked  # exactly what the native indexer ranks, mask included

    ours = adapter.chunked_topk(indexer, *seen["args"][:4], chunk_rows=CHUNK)
    assert ours.dtype == torch.int32 and ours.shape == native.shape == (2, SEQ_LEN, 8)

    # Heads are summed in another order, so scores may differ in their last bits: the selected scores agree
    # closely, and the selected keys (those the mask allows) agree on every row without a tie at the k-th
    # score. Ties are real here: where relu zeroes every head, many keys score exactly 0.
    assert torch.allclose(native_scores.gather(-1, ours.long()).sort(-1).values,
                          native_scores.gather(-1, native.long()).sort(-1).values, rtol=1e-5, atol=1e-6)
    valid = mask if mask.dtype == torch.bool else mask == 0
    chosen = [torch.zeros_like(valid).scatter(-1, sel.long(), True) & valid for sel in (ours, native)]
    top = native_scores.masked_fill(~valid, float("-inf")).topk(9, dim=-1).values
    clear = top[..., 8].isneginf() | (top[..., 7] - top[..., 8] > 1e-5)
    assert clear.float().mean() > 0.9
    assert torch.equal(chosen[0][clear], chosen[1][clear])


def test_chunked_model_matches_native_and_keeps_its_state(model_type):
    model = apply_indexcache(build_tiny(model_type), "FSFS")
    input_ids, attention_mask = padded_batch()
    native = logits(model, input_ids, attention_mask)
    native_generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    keys = set(model.state_dict())
    use_chunked_selection(model, CHUNK)
    # The same top-k sets give the same attention masks, so the logits are bit-identical.
    assert torch.equal(logits(model, input_ids, attention_mask), native)
    assert set(model.state_dict()) == keys
    # Prefill goes through the cache in chunks, then each decoding step (one query) takes the native forward.
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, native_generated)


def test_patch_follows_indexers_back_from_the_stash_and_undoes(model_type):
    model = build_tiny(model_type)
    input_ids, attention_mask = padded_batch()
    native = logits(model, input_ids, attention_mask)
    adapter = get_adapter(model)
    use_chunked_selection(apply_indexcache(model, "FSSF"), CHUNK)
    apply_indexcache(model, "FFFF")
    indexers = [adapter.indexer(model, layer) for layer in range(4)]
    assert all(indexer.selection_chunk_rows == CHUNK for indexer in indexers)
    assert torch.equal(logits(model, input_ids, attention_mask), native)
    use_chunked_selection(model, None)
    assert not any({"forward", "selection_chunk_rows"} & set(vars(indexer)) for indexer in indexers)
    with pytest.raises(ValueError, match="positive"):
        use_chunked_selection(model, 0)


def test_chunked_selection_never_builds_the_full_scores(model_type):
    """Memory on CPU, measured as the largest tensor allocated: the native forward allocates the fp32
    [B, L, Hi, L] scores; the chunked one nothing above its fp32 [B, C, L] block."""
    batch, seq_len, chunk, heads = 2, 2048, 256, 4
    model = build_tiny(model_type, index_n_heads=heads, max_position_embeddings=seq_len)
    indexer = get_adapter(model).indexer(model, 0)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq_len, model.config.hidden_size, generator=generator)
    q_resid = torch.randn(batch, seq_len, model.config.q_lora_rank, generator=generator)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(seq_len)[None])
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(batch, -1, -1)
    inputs = (hidden, q_resid, position_embeddings, causal, None)

    with torch.no_grad(), OpRecorder() as native:
        expected = indexer(*inputs)
    use_chunked_selection(model, chunk)
    with torch.no_grad(), OpRecorder() as chunked:
        selected = indexer(*inputs)

    assert native.largest >= batch * seq_len * heads * seq_len * 4
    assert chunked.largest == batch * chunk * seq_len * 4
    assert torch.equal(selected[:, -1].sort(-1).values, expected[:, -1].sort(-1).values)
