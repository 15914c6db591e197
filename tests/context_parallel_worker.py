"""One rank of the context-parallel test (tests/test_context_parallel.py): a distillation step of a tiny model in
each stage and teacher form, once on this rank alone and once split over the gloo group, with the sampled
recall; writes both runs' results."""

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # conftest's build_tiny
from conftest import build_tiny  # noqa: E402

from indexcache_train import distill, sparse_forward, use_sparse_forward  # noqa: E402
from indexcache_train.capture import capture_topk  # noqa: E402
from indexcache_train.context_parallel import ContextParallel, gather_sequence  # noqa: E402
from indexcache_train.distill import IndexerDistillation  # noqa: E402


# Sampled recall rows: at L = 40 on 2 ranks all in rank 0's second chunk, at 37 and 9 on 4 ranks across chunks.
RECALL_ROWS = 6


def step(model_type: str, input_ids: torch.Tensor, stage: str, teacher_form: str, context_parallel):
    # 16 indexer heads: a logit is an exact tie (0, every head's relu off) with chance 2^-16, not 1/16. torch.topk
    # breaks ties by the width of the key block it ranks, which differs between the runs as between chunkings.
    model = use_sparse_forward(build_tiny(model_type, initializer_range=0.2, index_n_heads=16))
    distillation = IndexerDistillation(model, "FSSF", stage=stage, kl_backend="torch", recall_rows=RECALL_ROWS,
                                       teacher_form=teacher_form, context_parallel=context_parallel)
    distillation.freeze()
    with capture_topk(model) as captured:
        loss, metrics = distillation(input_ids)
        topk = dict(captured)
    loss.backward()
    # (A parameter that the loss does not reach has no gradient on either run: zeros.)
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad
             for name, p in distillation.named_parameters() if p.requires_grad}
    if context_parallel is not None:
        loss = context_parallel.all_reduce_sum(loss)
        grads = {name: context_parallel.all_reduce_sum(g) for name, g in grads.items()}
        with context_parallel.activate(input_ids.shape[1]) as layout:
            topk = {layer: gather_sequence(t, layout) for layer, t in topk.items()}
    # A row's top-k is a set: compare sorted slots.
    topk = {layer: t.sort(-1).values for layer, t in topk.items()}
    return {"loss": loss.detach(), "metrics": metrics, "grads": grads, "topk": topk}


def refused() -> list[str]:
    """The setups that context parallelism refuses, each with its error."""
    errors = []
    model = build_tiny(initializer_range=0.2)
    for stage in distill.STAGES:  # transformers' native forward
        try:
            IndexerDistillation(use_sparse_forward(model, False), "FSSF", stage=stage,
                                context_parallel=ContextParallel())
        except ValueError as error:
            errors.append(str(error))
    distillation = IndexerDistillation(use_sparse_forward(model), "FSSF", stage="sparse",
                                       context_parallel=ContextParallel())
    try:  # fewer tokens than chunks
        distillation(torch.zeros(1, 2 * dist.get_world_size() - 1, dtype=torch.long))
    except ValueError as error:
        errors.append(str(error))
    return errors


def main(output: str, *cases: str) -> None:
    """cases: model_type/setups/lengths, setups comma-separated stage:teacher_form pairs and lengths
    comma-separated, e.g. "glm_moe_dsa/sparse:auto,dense:auto/40,37"."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    # Small blocks of attention and teacher rows, so that blocks start inside a rank's chunks and cross them.
    sparse_forward.ATTENTION_CHUNK_ROWS, distill.TEACHER_BLOCK_ROWS = 3, 4
    results = {"refused": refused()}
    for case in cases:
        model_type, setups, lengths = case.split("/")
        results[model_type] = {}
        for length in map(int, lengths.split(",")):
            input_ids = torch.randint(0, 257, (2, length), generator=torch.Generator().manual_seed(length))
            results[model_type][length] = {
                setup: {"one_rank": step(model_type, input_ids, *setup, None),
                        "context_parallel": step(model_type, input_ids, *setup, ContextParallel())}
                for setup in (tuple(pair.split(":")) for pair in setups.split(","))}
    torch.save(results, f"{output}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
