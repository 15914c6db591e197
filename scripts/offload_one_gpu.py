"""Distil a base twice the size of a capped GPU on that one GPU: ZeRO-3 with the parameters offloaded to CPU.

    python scripts/offload_one_gpu.py --output /tmp/offload_run          # ~8.5B random GlmMoeDsa, GPU capped

1. builds (once) a random GlmMoeDsa of `--layers` layers in bf16 and saves it to `<output>/base`, checking that it
   is at least twice the capped GPU memory (`--gpu-memory-fraction` of the device);
2. runs the trainer on one GPU: `deepspeed=zero3_offload`, `trainer.gpu_memory_fraction` set, a few steps of
   both stages, and the export;
3. reloads the export with plain transformers and checks its pattern and trained indexers;
4. prints the measured peak (the largest per-step `torch.cuda.max_memory_allocated`) against the plan the
   trainer printed at start (`plan.json`), and writes both to `<output>/offload_one_gpu.json`, with the
   trainer's memory report of the last step (`trainer.memory_report_step`: what is alive at its peak, by site).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from indexcache_train.files import write_text_atomically
from indexcache_train.modeling import byte_tokenizer, tiny_config
from indexcache_train.plan import GIB, calibration, meta_model


def base_config(layers: int):
    return tiny_config(
        hidden_size=4096, intermediate_size=8192, moe_intermediate_size=1024, n_routed_experts=64,
        num_experts_per_tok=4, n_shared_experts=1, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=32, q_lora_rank=1024, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, index_n_heads=16, index_head_dim=128, index_topk=512, max_position_embeddings=16384,
        initializer_range=0.02)


def build_base(path: Path, layers: int, cap_bytes: float) -> int:
    """Save the random base (unless it is there) and return its size in bytes."""
    config = base_config(layers)
    size = 2 * sum(p.numel() for p in meta_model(config).parameters())
    if size < 2 * cap_bytes:
        raise SystemExit(f"A {size / GIB:.1f} GiB base is not twice the {cap_bytes / GIB:.1f} GiB cap: raise --layers.")
    if not (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        staging = path.with_name(path.name + ".tmp")
        model.save_pretrained(staging, max_shard_size="2GB")
        byte_tokenizer().save_pretrained(staging)
        os.replace(staging, path)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--gpu-memory-fraction", type=float, default=0.05)
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("This run needs a CUDA GPU.")
    cap = torch.cuda.get_device_properties(0).total_memory * args.gpu_memory_fraction
    args.output.mkdir(parents=True, exist_ok=True)
    base = args.output / "base"
    base_bytes = build_base(base, args.layers, cap)
    run = args.output / "run"
    command = [sys.executable, "-m", "indexcache_train.train", "model=from_pretrained", f"model.name_or_path={base}",
               "model.dtype=bfloat16", "data=stdlib", f"data.seq_len={args.seq_len}", "deepspeed=zero3_offload",
               f"trainer.gpu_memory_fraction={args.gpu_memory_fraction}", "data.batch_size=1",
               f"trainer.max_steps={args.steps}", "trainer.warmup_steps=1", f"trainer.save_every={args.steps}",
               "trainer.eval_batches=1", "distill.pattern=0.25", "distill.stage=schedule",
               f"distill.dense_steps={args.steps // 2}", f"trainer.memory_report_step={args.steps}",
               "logger=disabled", f"output_dir={run}", "resume=null",
               # The cap bounds PyTorch's allocator only; the CUDA context lies outside it, so keep just some slack.
               "plan.reserve_gib=0.5"]
    # Under a cap, blocks freed between layers must be reusable by the next layer's differently sized ones.
    subprocess.run(command, check=True, env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.bfloat16)
    trained = load_file(run / "checkpoints" / f"step{args.steps}" / "trainable.safetensors")
    state = exported.state_dict()
    reloads = all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in trained.items())
    plan = json.loads((run / "plan.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = max(m["peak_memory_gib"] for m in metrics)
    report = json.loads((run / "memory_report_rank0.json").read_text())
    # DeepSpeed allocates the gathered parameters in partition_parameters.py: the part of the peak the plan's
    # weights.gathered term stands for
    gathered = sum(site["gib"] for site in report["sites"] if site["site"].startswith("partition_parameters.py"))
    result = {"base_gib": base_bytes / GIB, "gpu_cap_gib": cap / GIB, "pattern": exported.config.index_topk_pattern,
              "export_reloads_with_trained_indexers": reloads, "plan": plan,
              "peak_by_step_gib": [m["peak_memory_gib"] for m in metrics], **calibration(plan, measured),
              "gathered_at_peak_gib": {"measured": gathered, "planned": plan["terms_gib"]["weights.gathered"]},
              "memory_report_last_step": report}
    write_text_atomically(args.output / "offload_one_gpu.json", json.dumps(result, indent=2))
    print(f"base {result['base_gib']:.1f} GiB on a GPU capped at {result['gpu_cap_gib']:.1f} GiB; export reloads "
          f"with its trained indexers: {reloads}; pattern {result['pattern']}")
    print(f"peak {measured:.2f} GiB measured, {plan['total_gib_per_gpu']:.2f} GiB planned "
          f"({100 * result['error']:+.1f}%); the activation_scale that would match: {result['activation_scale']:.3f}")
    print(f"parameters gathered at the last step's peak: {gathered:.2f} GiB measured, "
          f"{plan['terms_gib']['weights.gathered']:.2f} GiB planned")


if __name__ == "__main__":
    main()
