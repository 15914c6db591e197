"""The memory planner: what one GPU holds during distillation, from a model config alone (the model is built
on the meta device; no weights are read).

Notation: b micro batch, L sequence length, R = b L rows; H heads, n/r/v the nope/rope/value head dims,
c = kv_lora_rank, q = q_lora_rank, d = hidden_size; Hi, Di, k the indexer's heads, head dim and top-k; I the
dense MLP width, I_e / E / e the expert width, count and experts per token; a = 2 bytes (bf16 activations),
w = 2 bytes per frozen weight (1 for an FP8 base kept in FP8); N the GPUs.

weights    ZeRO 0-2: w P_frozen.  ZeRO-3: w P_frozen / N (0 with offload_param) + w G: G the most parameters
           DeepSpeed holds gathered at once in a step, found by replaying its fetch schedule
           (`zero3_gathered_peak`): the decoder's modules in forward order, each gathered when it runs and
           released after it, and after each fetch a prefetch of the next parameters in that order, which
           stops once it has taken stage3_prefetch_bucket_size (5e7) or the gathered count has reached
           stage3_max_live_parameters (1e9) -- but only after the parameter that crossed the limit, so one
           whole expert tensor can come on top. Parameters below stage3_param_persistence_threshold (1e5) stay
           gathered throughout.
optimizer  the F indexers' states, from DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`
           with P_trainable and the largest trainable module), which count 16-bit weights and gradients,
           fp32 master weights, Adam moments and, for ZeRO-3, one gathered trainable module; plus, for ZeRO-3,
           w 5e8: the gradient bucket of its default reduce_bucket_size, allocated at start whatever P_trainable.
activations the frozen sparse forward's peak, per GPU, in bytes:
  stream       3 a R d                                   (hidden states, residual, normed input)
  groups       R [(Hi Di + Di + Hi)(a + 4) + a (d + q + Di) + 4 k]
               one F group's IndexerKLLoss (each group is finished, its gradients taken and its state freed,
               after its last layer): its q/k/w with grad, their fp32 gradient accumulators, the inputs the
               projections' backward saved, and the group's int32 top-k
  attention    a R (q + H (n + r) + (c + r)) + max of three phases:
                 indexer  4 R (Hi Di + Di + Hi) + 4 min(2^28, b L^2) + 4 R k   (fp32 q/k/w, logits block, top-k)
                 KL       4 min(2^26, R k) + b min(16384, L) H a (c + r) + a R H v + 4 R H
                          (p buffer, the absorbed teacher block; the taps run after the attention, so its
                          output and log-sum-exp are still there)
                 sparse   b C H (a (c + r) + a c) + a R H v + a R d, C = min(8192, L)
                          (absorbed query block, latent output, attention output, o_proj)
  mlp          in blocks of M = b min(16384, L) tokens, M_e = b min(16384 / e, L) for an MoE (the frozen
               forward's MLP blocks): max(dense 3 a M I + a M d,
               routed 3 a M_e e I_e + (2 a + 8) M_e e d + 3 a M_e I_e n_shared + 4 M_e E + a M_e d) + a R d
               (gate/up and the activation; the routed copies: sorted input, expert output, its fp32 weighted
               and unpermuted forms, which are no copies when a = 4; the block's input; the output)
  peak         stream + groups + max(attention, mlp)

The families on transformers' reference forward (`REFERENCE_FORWARD_TERMS`: Glm5Next, DeepSeek-V4) hold
the whole sequence at once, MLP included (mlp above with M = M_e = R); their hyper-connections keep hc =
hc_mult streams, so stream = a R d (hc + 2) (the streams, the layer's input and the embeddings). The
distillation state is the groups term above, with the indexer's compression inputs (k' top-k slots); it is
counted in every phase, though an F layer's group opens only after its indexer has run.
  glm5_next    every 4th layer MLA with a pooled indexer, C = L / P pools of P = index_kpool keys, k' = k + P - 1;
               the others KDA, Hl / Dl = linear_num_heads / linear_head_dim.
               attention  a R (q + H (n + r) + (c + r) + H (n + v) + H (n + r)) + max of
                 indexer  b L^2 + 12 R Hi C + a R Hi Di   (visible-token mask; fp32 pool scores, their scaled
                          and relu'd copies; +4 R Hi Di for the query's fp32 copy when a = 2)
                 KL       a b L^2 + a R (H + 1)(c + r)   (the float top-k mask; the absorbed query and key)
                 mask     max(5 + a, 2 a + 1) b L^2 + a R H v   (int32 counts, bool and float masks from the
                          top-k; the tap's re-folded copy; the attention output)
               linear     4 R Hl Dl (3 c_l + 6) + 5 a R Hl Dl   (KDA in chunks of c_l = 64: the fp32 decay mask
                          [R, c_l, Hl Dl] and the two products of the intra-chunk scores, the fp32 q/k/v/g/beta
                          forms; the projections and their convolution). The reference chunked KDA, as
                          transformers runs it without flash-linear-attention.
               peak       stream + groups + max(attention, linear, mlp)
  deepseek_v4  its CSA layers (the longest keys, L + T with T = L / m entries, m the CSA compress rate), eager:
               attention  a R (q + H D + D) + a b (L + T) D + max of
                 indexer  12 R Hi T + a R Hi Di + 4 a R D   (fp32 scores, relu'd, weighted; the compressor's
                          kv and gate projections)
                 eager    3 a R H (L + T + 1) + a R (2 L + 2 T) + 2 a b H (L + T) D   (scores, the logits with the
                          sink, their centred copy; the causal mask, the mask with the compressed block bias and
                          the bias; the key and value repeated over the H heads)
               peak       stream + groups + max(attention, mlp)

Calibration: `activation_scale` multiplies the activation terms and `reserve_gib` is set aside for the CUDA
context, NCCL and the allocator; `calibration(plan, measured_gib)` says which factor a measured peak implies.
Every term is in `plan.json` under `terms_gib` (under ZeRO-3 with `weights.gathered`, w G), so a measured peak
can be compared term by term. The terms alone come to 1.01-1.02 of measured peaks on an H200
(docs/results/bench_long_context_h200.json, the sparse step of a 4-layer DeepSeek-V3.2-shaped model at 64K /
128K / 200K: 0.985 / 0.979 / 0.977 implied) and to 1.14 of one on a CPU (tests/test_plan.py, fp32; 1.03 for
DeepSeek-V4 and 1.07 for Glm5Next on the reference forward), so the default scale is `ACTIVATION_SCALE` = 0.98,
which puts those three H200 peaks within 1%. `trainer.memory_report_step` shows what a step holds at its peak,
by line of code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

GIB = 2**30
ACTIVATION_SCALE = 0.98  # measured peaks over the activation terms (module docstring)
H200_GIB = 139.8  # torch.cuda.get_device_properties(...).total_memory of an H200, in GiB
# DeepSpeed's ZeRO-3 defaults, in parameters: the gathered count past which it stops prefetching, what one
# prefetch takes, and the size below which a parameter stays gathered
MAX_LIVE_PARAMETERS, PREFETCH_BUCKET, PERSISTENCE_THRESHOLD = 1e9, 5e7, 1e5
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size: ZeRO-3 keeps a gradient bucket this large on the GPU
LOGITS_BLOCK, P_BUFFER = 1 << 28, 1 << 26  # elements: the indexer top-k's and the sparse KL's fp32 blocks
# rows per block: sparse attention queries, absorbed teacher rows in the KL, MLP tokens of the frozen forward
ATTENTION_ROWS, TEACHER_ROWS, MLP_ROWS = 8192, 16384, 16384
KDA_CHUNK = 64  # tokens per chunk of transformers' reference KDA (chunk_kimi_delta_attention)


@dataclass(frozen=True)
class Zero3Sizes:
    """The ZeRO-3 settings the plan depends on, in parameters (elements for the bucket), DeepSpeed's defaults
    unless `deepspeed.config.zero_optimization` sets them."""

    max_live_parameters: float = MAX_LIVE_PARAMETERS
    prefetch_bucket: float = PREFETCH_BUCKET
    persistence_threshold: float = PERSISTENCE_THRESHOLD
    reduce_bucket: float = REDUCE_BUCKET

    @classmethod
    def from_deepspeed_config(cls, overrides) -> Zero3Sizes:
        section = (overrides or {}).get("zero_optimization") or {}
        keys = {"max_live_parameters": "stage3_max_live_parameters", "prefetch_bucket": "stage3_prefetch_bucket_size",
                "persistence_threshold": "stage3_param_persistence_threshold", "reduce_bucket": "reduce_bucket_size"}
        sizes = {}
        for name, key in keys.items():
            if key in section:
                try:
                    sizes[name] = float(section[key])
                except (TypeError, ValueError):
                    raise ValueError(f"deepspeed.config.zero_optimization.{key}={section[key]!r}: the memory plan "
                                     "needs a number here (no 'auto').") from None
        return cls(**sizes)


@dataclass
class Plan:
    params_total: int
    params_trainable: int
    weights_gib_per_gpu: float
    optimizer_gib_per_gpu: float
    activations_gib_per_gpu: float
    total_gib_per_gpu: float
    gpu_gib: float | None  # None: planned without a GPU to fit (the trainer on a CPU)
    fits: bool | None
    world_size: int
    seq_len: int
    micro_batch_size: int
    pattern: str
    zero_stage: int
    offload_param: str
    offload_optimizer: str
    terms_gib: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("parameters (total / trainable)", f"{self.params_total / 1e9:.2f}B / {self.params_trainable / 1e6:.1f}M"),
                ("weights per GPU", f"{self.weights_gib_per_gpu:.1f} GiB"),
                ("optimizer per GPU", f"{self.optimizer_gib_per_gpu:.2f} GiB"),
                ("activations per GPU", f"{self.activations_gib_per_gpu:.1f} GiB"),
                ("total per GPU", f"{self.total_gib_per_gpu:.1f} GiB"
                                  + (f" of {self.gpu_gib:.1f}" if self.gpu_gib is not None else "")),
                ("fits", {True: "yes", False: "NO", None: "- (no GPU)"}[self.fits])]
        head = (f"Memory plan: {self.world_size} GPU(s), L={self.seq_len}, micro batch {self.micro_batch_size}, "
                f"pattern {self.pattern}, ZeRO-{self.zero_stage}, offload param={self.offload_param} "
                f"optimizer={self.offload_optimizer}")
        width = max(len(r[0]) for r in rows)
        return "\n".join([head] + [f"  {label:<{width}}  {value}" for label, value in rows])


def plan_from_config(cfg, *, world_size: int, gpu_gib: float | None, config=None, dtype_bytes: int = 2) -> Plan:
    """The plan of a trainer (or planner) config: its model (built on the meta device from `config`, or from
    the config `cfg.model` names), data.seq_len, data.batch_size (the micro batch), distill.pattern and
    deepspeed groups."""
    from .fp8 import quant_method
    from .modeling import load_model_config

    config = config if config is not None else load_model_config(cfg.model)
    zero_stage = cfg.deepspeed.zero_stage
    # Only the native route keeps FP8 weights in memory; ZeRO-3 and model.fp8=dequantize hold model.dtype.
    fp8_base = quant_method(config) == "fp8" and cfg.model.fp8 != "dequantize" and zero_stage != 3
    # A copy: building a model writes into its config (attention implementation, dtype), and the run loads with it
    return plan_memory(meta_model(copy.deepcopy(config)), world_size=world_size,
                       seq_len=cfg.data.seq_len, micro_batch_size=cfg.data.batch_size,
                       pattern=cfg.distill.pattern, zero_stage=zero_stage, offload_param=cfg.deepspeed.offload_param,
                       offload_optimizer=cfg.deepspeed.offload_optimizer, fp8_base=fp8_base, gpu_gib=gpu_gib,
                       activation_scale=cfg.plan.activation_scale, reserve_gib=cfg.plan.reserve_gib,
                       dtype_bytes=dtype_bytes, zero3=Zero3Sizes.from_deepspeed_config(cfg.deepspeed.config))


def meta_model(config) -> nn.Module:
    """The architecture on the meta device: shapes only. Not under a live ZeRO-3 `zero.ZeroContext`, where
    transformers would build it under `deepspeed.zero.Init` and initialise meta tensors."""
    from .modeling import model_from_config
    from .zero import zero3_enabled

    if zero3_enabled():
        raise RuntimeError("Plan before the ZeRO-3 context exists: a meta model cannot be built under zero.Init.")

    with torch.device("meta"):
        return model_from_config(config)


def plan_memory(model: nn.Module, *, world_size: int, seq_len: int, micro_batch_size: int, pattern,
                zero_stage: int, offload_param: str = "none", offload_optimizer: str = "none", fp8_base: bool = False,
                gpu_gib: float | None = H200_GIB, activation_scale: float = ACTIVATION_SCALE, reserve_gib: float = 2.0,
                dtype_bytes: int = 2, zero3: Zero3Sizes = Zero3Sizes()) -> Plan:
    """The per-GPU plan for distilling `model` with `pattern`: a model as built (meta or loaded, partitioned or
    not) before any pattern is applied, so that every indexer is in place. The S layers' indexers count as
    frozen weights: they stay in memory, off the module tree, until the export drops them. `dtype_bytes` is
    the run's compute dtype (2: bf16, DeepSpeed's on a GPU; 4: fp32), for weights and activations."""
    from .adapters import get_adapter
    from .pattern import IndexCachePattern

    adapter = get_adapter(model)
    pattern = IndexCachePattern.coerce(pattern, adapter.num_layers(model))
    indexers = [adapter.indexer(model, layer) for layer in pattern.full_layers]
    if any(i is None for i in indexers):
        raise ValueError(f"plan_memory wants the model as built, with an indexer on every F layer of {pattern}.")
    trainable_ids = {id(p) for i in indexers for p in i.parameters()}
    params_total = sum(_numel(p) for p in model.parameters())
    params_trainable = sum(_numel(p) for i in indexers for p in i.parameters())
    frozen_bytes = sum(_numel(p) * _frozen_bytes(name, fp8_base, dtype_bytes) for name, p in model.named_parameters()
                       if id(p) not in trainable_ids)
    largest_trainable = max(sum(_numel(p) for p in m.parameters(recurse=False)) for i in indexers for m in i.modules())

    if zero_stage == 3:
        share = 0 if offload_param != "none" else frozen_bytes / world_size
        trace = zero3_fetch_trace(model, adapter, pattern, persistence_threshold=zero3.persistence_threshold)
        persistent = sum(_numel(p) for p in model.parameters() if _numel(p) < zero3.persistence_threshold)
        gathered = dtype_bytes * zero3_gathered_peak(trace, zero3)
        weights = share + dtype_bytes * persistent + gathered
    else:
        weights = frozen_bytes
    optimizer = _optimizer_bytes(params_trainable, largest_trainable, world_size, zero_stage, offload_param,
                                 offload_optimizer)
    if zero_stage == 3:  # allocated at start for contiguous gradients, whatever the trainable count
        optimizer += zero3.reduce_bucket * dtype_bytes
    terms = model_activation_terms(model.config, batch=micro_batch_size, seq_len=seq_len, act_bytes=dtype_bytes)
    activations = activation_scale * activation_peak(terms)
    if zero_stage == 3:
        terms["weights.gathered"] = gathered  # beside the activation terms, to compare with a memory report
    total = (weights + optimizer + activations) / GIB
    return Plan(
        params_total=params_total, params_trainable=params_trainable, weights_gib_per_gpu=weights / GIB,
        optimizer_gib_per_gpu=optimizer / GIB, activations_gib_per_gpu=activations / GIB, total_gib_per_gpu=total,
        gpu_gib=gpu_gib, fits=None if gpu_gib is None else total <= gpu_gib - reserve_gib, world_size=world_size, seq_len=seq_len,
        micro_batch_size=micro_batch_size, pattern=str(pattern), zero_stage=zero_stage, offload_param=offload_param,
        offload_optimizer=offload_optimizer, terms_gib={k: v / GIB for k, v in terms.items()},
    )


def zero3_fetch_trace(model: nn.Module, adapter, pattern, *,
                      persistence_threshold: float) -> list[list[tuple[int, int]]]:
    """The modules one distillation step's frozen forward runs, in order, each as its own partitioned
    parameters (id, numel): the decoder's modules in registration order, which is their forward order in
    these models up to the layer norms (persistent) and the o_proj/indexer swap, less the S layers' indexers,
    which the pattern takes off the model. The LM head does not run in distillation."""
    dropped = {id(p) for layer in pattern.shared_layers for p in adapter.indexer(model, layer).parameters()}
    trace = []
    for module in adapter.decoder(model).modules():
        own = [(id(p), _numel(p)) for p in module.parameters(recurse=False)
               if id(p) not in dropped and _numel(p) >= persistence_threshold]
        if own:
            trace.append(own)
    return trace


def zero3_gathered_peak(trace: Sequence[Sequence[tuple[int, int]]], sizes: Zero3Sizes) -> int:
    """The most parameters gathered at once when DeepSpeed's ZeRO-3 coordinator runs `trace` (a list of
    modules, each a list of (parameter id, numel)) with a complete trace of it, as its
    `PartitionedParameterCoordinator` does: fetch the module's parameters, move the prefetch queue past them,
    prefetch the queue's next ones not yet gathered while fewer than min(max_live - gathered, bucket) have
    been taken, then release the module's parameters unless a later use of them has already been prefetched."""
    uses = [(step, pid, numel) for step, module in enumerate(trace) for pid, numel in module]
    gathered: set[int] = set()
    held = 0  # the parameters in `gathered`, DeepSpeed's n_available_params
    prefetched_until: dict[int, int] = {}  # parameter -> the latest step whose use of it the queue has passed
    head = peak = 0

    def gather(pid: int, numel: int) -> int:
        if pid in gathered:
            return 0
        gathered.add(pid)
        return numel

    for step, module in enumerate(trace):
        for pid, numel in module:
            held += gather(pid, numel)
        while head < len(uses) and uses[head][0] <= step:
            head += 1
        budget, taken = min(sizes.max_live_parameters - held, sizes.prefetch_bucket), 0
        while head < len(uses) and taken < budget:
            use_step, pid, numel = uses[head]
            head += 1
            prefetched_until[pid] = max(prefetched_until.get(pid, use_step), use_step)
            taken += gather(pid, numel)
        held += taken
        peak = max(peak, held)
        for pid, numel in module:
            if pid in gathered and prefetched_until.get(pid, step) <= step:
                gathered.remove(pid)
                held -= numel
    return peak


def activation_terms(config, *, batch: int, seq_len: int, act_bytes: int = 2,
                     logits_block: int = LOGITS_BLOCK) -> dict[str, float]:
    """The activation terms of the module docstring, in bytes. `logits_block`: the top-k's fp32 block in
    elements, 2^28 on a GPU (2^26 on a CPU, where the planner is checked)."""
    a, b, L = act_bytes, batch, seq_len
    rows = b * L
    H, n, r, v = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim)
    c, q, d = config.kv_lora_rank, config.q_lora_rank or config.hidden_size, config.hidden_size
    hi, di, k = config.index_n_heads, config.index_head_dim, min(config.index_topk, L)
    index_elems = hi * di + di + hi
    stream = 3 * a * rows * d
    groups = rows * (index_elems * (a + 4) + a * (d + q + di) + 4 * k)
    indexer = 4 * rows * index_elems + 4 * min(logits_block, b * L * L) + 4 * rows * k
    kl = 4 * min(P_BUFFER, rows * k) + b * min(TEACHER_ROWS, L) * H * a * (c + r) + a * rows * H * v + 4 * rows * H
    chunk = min(ATTENTION_ROWS, L)
    sparse = b * chunk * H * (a * (c + r) + a * c) + a * rows * H * v + a * rows * d
    attention = a * rows * (q + H * (n + r) + (c + r)) + max(indexer, kl, sparse)
    mlp = _mlp_bytes(config, a, rows, block=b * min(MLP_ROWS, L), block_e=b * min(MLP_ROWS // _per_token(config), L))
    return {"stream": stream, "groups": groups, "attention": attention, "mlp": mlp,
            "attention.indexer": indexer, "attention.kl": kl, "attention.sparse": sparse}


def glm5_next_activation_terms(config, *, batch: int, seq_len: int, act_bytes: int = 2) -> dict[str, float]:
    """The activation terms of a `Glm5NextForConditionalGeneration` step on transformers' reference forward
    (module docstring), in bytes; `config` is its text config."""
    a, b, L = act_bytes, batch, seq_len
    rows, square = b * L, b * L * L
    H, n, r, v = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim)
    c, q, d = config.kv_lora_rank, config.q_lora_rank, config.hidden_size
    hi, di, k = config.index_n_heads, config.index_head_dim, min(config.index_topk + config.index_kpool - 1, L)
    pools = L // config.index_kpool
    hl_dl = config.linear_num_heads * config.linear_head_dim
    stream = a * rows * d * (config.hc_mult + 2)
    groups = rows * ((hi * di + di + hi) * (a + 4) + a * (d + q + di) + (3 * a + 8) * di + 4 * k)
    upcast = 4 if a < 4 else 0  # the fp32 copy of the indexer's query, none when it is fp32 already
    indexer = square + 12 * rows * hi * pools + (a + upcast) * rows * hi * di
    kl = a * square + a * rows * (H + 1) * (c + r)
    mask = max(5 + a, 2 * a + 1) * square + a * rows * H * v
    attention = a * rows * (q + H * (n + r) + (c + r) + H * (n + v) + H * (n + r)) + max(indexer, kl, mask)
    linear = 4 * rows * hl_dl * (3 * KDA_CHUNK + 6) + 5 * a * rows * hl_dl
    mlp = _mlp_bytes(config, a, rows, block=rows, block_e=rows)
    return {"stream": stream, "groups": groups, "attention": attention, "linear": linear, "mlp": mlp,
            "attention.indexer": indexer, "attention.kl": kl, "attention.mask": mask}


def deepseek_v4_activation_terms(config, *, batch: int, seq_len: int, act_bytes: int = 2) -> dict[str, float]:
    """The activation terms of a `DeepseekV4ForCausalLM` step on transformers' eager reference forward
    (module docstring), in bytes: its CSA layers, whose compressed entries lengthen every query's keys most."""
    a, b, L = act_bytes, batch, seq_len
    rows = b * L
    H, D, q, d = config.num_attention_heads, config.head_dim, config.q_lora_rank, config.hidden_size
    hi, di, k = config.index_n_heads, config.index_head_dim, config.index_topk
    entries = L // config.compress_rates["compressed_sparse_attention"]
    keys = L + entries
    stream = a * rows * d * (config.hc_mult + 2)
    groups = rows * ((hi * di + hi) * (a + 4) + a * (d + q + 4 * di) + 4 * k) + entries * b * di * (a + 4)
    upcast = 4 if a < 4 else 0  # the fp32 copy of the indexer's query, none when it is fp32 already
    indexer = 12 * rows * hi * entries + (a + upcast) * rows * hi * di + 4 * a * rows * D
    eager = 3 * a * rows * H * (keys + 1) + a * rows * (L + keys + entries) + 2 * a * b * H * keys * D
    attention = a * rows * (q + H * D + D) + a * b * keys * D + max(indexer, eager)
    mlp = _mlp_bytes(config, a, rows, block=rows, block_e=rows)
    return {"stream": stream, "groups": groups, "attention": attention, "mlp": mlp,
            "attention.indexer": indexer, "attention.eager": eager}


# The families on transformers' reference forward, which `activation_terms` (the sparse forward's) does not model
REFERENCE_FORWARD_TERMS = {"glm5_next": glm5_next_activation_terms, "deepseek_v4": deepseek_v4_activation_terms}


def model_activation_terms(config, *, batch: int, seq_len: int, act_bytes: int = 2) -> dict[str, float]:
    """The activation terms of the family `config` describes."""
    from .modeling import text_config

    terms = REFERENCE_FORWARD_TERMS.get(config.model_type, activation_terms)
    return terms(text_config(config), batch=batch, seq_len=seq_len, act_bytes=act_bytes)


def activation_peak(terms: dict[str, float]) -> float:
    """stream + groups + the largest of the other phases (the top-level terms; a dotted one is part of one)."""
    phases = [value for name, value in terms.items() if "." not in name and name not in ("stream", "groups")]
    return terms["stream"] + terms["groups"] + max(phases)


def _per_token(config) -> int:
    return getattr(config, "num_experts_per_tok", None) or 1


def _mlp_bytes(config, a: int, rows: int, *, block: int, block_e: int) -> float:
    """The mlp term over blocks of `block` tokens (`block_e` for an MoE); the whole sequence on the reference
    forward, which does not block its MLP."""
    d = config.hidden_size
    dense_mlp = 3 * a * block * config.intermediate_size
    routed = 0
    experts = getattr(config, "n_routed_experts", None) or 0
    if experts:
        per_token, width = _per_token(config), config.moe_intermediate_size
        upcasts = 8 if a < 4 else 0  # the two fp32 forms are copies only when activations are not fp32
        routed = (3 * a * block_e * per_token * width + (2 * a + upcasts) * block_e * per_token * d
                  + 3 * a * block_e * width * (getattr(config, "n_shared_experts", 0) or 0)
                  + 4 * block_e * experts + a * block_e * d)
    return max(dense_mlp + a * block * d, routed) + a * rows * d


def calibration(plan: Plan | dict, measured_gib: float) -> dict[str, float]:
    """How a measured peak (torch.cuda.max_memory_allocated) compares with the plan, and the
    `activation_scale` that would make the plan match it."""
    plan = plan.to_dict() if isinstance(plan, Plan) else plan
    static = plan["weights_gib_per_gpu"] + plan["optimizer_gib_per_gpu"]
    return {"measured_gib": measured_gib, "planned_gib": plan["total_gib_per_gpu"],
            "error": (plan["total_gib_per_gpu"] - measured_gib) / measured_gib,
            "activation_scale": (measured_gib - static) / plan["activations_gib_per_gpu"]
            if plan["activations_gib_per_gpu"] else math.nan}


def _optimizer_bytes(params: int, largest: int, world: int, stage: int, offload_param: str,
                     offload_optimizer: str) -> float:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest, num_gpus_per_node=world, cpu_offload=offload_optimizer != "none",
            cpu_offload_params=offload_param != "none", additional_buffer_factor=1.0)
        return gpu
    # ZeRO-0 keeps every state on every GPU: the ZeRO-2 estimate over a world of one.
    _, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=world if stage else 1,
                                                   cpu_offload=offload_optimizer != "none",
                                                   additional_buffer_factor=1.0)
    return gpu


def _frozen_bytes(name: str, fp8_base: bool, dtype_bytes: int) -> int:
    if fp8_base and name.endswith(("proj.weight", "gate_up_proj", "down_proj")) and ".indexer." not in name:
        return 1  # FP8Linear / FP8Experts weights; their fp32 scales add 1/4096 of that
    return dtype_bytes


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())


def check_run_plan(cfg, config, *, world_size: int, device: torch.device, dtype_bytes: int) -> Plan:
    """The trainer's start-of-run plan for the model `config` describes, before any weight is read; on a GPU,
    a clear error when it does not fit."""
    capacity = None
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory / GIB
        capacity *= cfg.trainer.gpu_memory_fraction or 1.0
    plan = plan_from_config(cfg, world_size=world_size, gpu_gib=capacity, config=config, dtype_bytes=dtype_bytes)
    if device.type == "cuda" and not plan.fits:
        raise RuntimeError(
            f"The memory plan does not fit: {plan.total_gib_per_gpu:.1f} GiB per GPU planned against "
            f"{capacity:.1f} GiB ({cfg.plan.reserve_gib} GiB kept free) -- weights {plan.weights_gib_per_gpu:.1f}, "
            f"optimizer {plan.optimizer_gib_per_gpu:.1f}, activations {plan.activations_gib_per_gpu:.1f}. Use more "
            "GPUs, deepspeed=zero3 or zero3_offload, a shorter data.seq_len, or trainer.check_plan=false to try anyway.")
    return plan
