"""Analytical cost of one optimizer step of a `ModelSpec` under a `Layout` on a cluster. No torch import.

What it models, and why each piece looks the way it does:
- FLOPs come from `ModelSpec.flops_per_token` (the one source); the time model splits the same work into the
  GEMM shapes one GPU runs (``T`` = tokens of one micro-batch on one context-parallel rank).
- GEMM time is a roofline on the shape: max(FLOPs / (MAMF · peak), bytes / (achievable HBM bandwidth)). MAMF is a
  published per-generation constant (hardware.py). Small or skinny GEMMs (few tokens per expert, tiny head dims)
  become bandwidth-bound by themselves; nothing is fitted per model.
- Elementwise work (norms, residual adds, activation functions, dropout, softmax without flash attention) is
  memory-bound: bytes moved / achievable HBM bandwidth. Backward moves about twice the forward bytes.
- Attention: flash attention (fused, causal half skipped) at a published kernel efficiency, or the unfused
  QKᵀ / softmax / AV path of 2021-22 Megatron-LM with the s² score tensors written to HBM.
- Communication: ring collectives (wire bytes 2(n−1)/n for all-reduce, (n−1)/n for all-gather/reduce-scatter),
  hierarchical when a group spans nodes (NVLink inside, the NICs of the node in parallel across), plus a
  latency term. What is hidden behind compute is set by the software `Stack`.
- Pipeline: (m + (p−1)/v) slots of the slowest stage's micro-batch time (Narayanan et al. 2021, §2.2).
- Memory: mixed-precision parameter/gradient/Adam bytes under the sharding, Korthikanti et al. 2022 activation
  memory generalised to GQA, gated MoE experts and flash attention, times the micro-batches a schedule keeps in
  flight, plus logits on the last stage.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

from gigafactory.specs.hardware import FabricSpec, GPUSpec, get_fabric
from gigafactory.specs.layout import Layout
from gigafactory.specs.model_spec import ModelSpec
from gigafactory.specs.moe import dispatched_rows

GIB = 1024**3


@dataclass(frozen=True)
class Stack:
    """What the training software overlaps and fuses. One per software generation/framework, never per run.

    ``dp_overlap``: fraction of the compute (per layer, see `_fsdp_exposed`) that can hide data-parallel traffic.
    ``tp_overlap``: fraction of tensor-parallel traffic hidden (TE userbuffers / async TP). ``ep_overlap``: fraction
    of the expert all-to-all hidden behind another micro-batch's compute (DualPipe / Megatron's 1F1B A2A overlap).
    ``fsdp``: data-parallel sharding is FSDP (parameters gathered per layer in every micro-batch); otherwise
    Megatron-style (gradients reduced and parameters gathered once per step, optimizer sharded when
    ``distributed_optimizer``). ``kernels_per_layer`` and ``kernel_gap_s``: GPU kernels a forward layer launches and
    the idle gap between two of them (launch latency not hidden, tail of the previous kernel); backward launches
    twice as many. ``fused_elementwise``: norms, rotary embedding and gated activations run as fused kernels (one
    read and one write, apex / Transformer Engine / torch.compile); False is eager PyTorch, where every op of an
    RMSNorm, RoPE or SwiGLU reads and writes HBM and the norm works in fp32 (`EAGER_BYTES`).
    """

    name: str
    flash_attention: bool
    sequence_parallel: bool = True
    dp_overlap: float = 1.0
    tp_overlap: float = 0.0
    pp_overlap: float = 0.0
    ep_overlap: float = 0.0
    reshard_after_forward: bool = True
    grad_reduce_bytes: int = 4  # fp32 gradient reduction (torchtitan reduce_dtype, Megatron main grads)
    dropout: bool = False
    # replicated data parallelism shards the optimizer (Megatron-Core --use-distributed-optimizer, ZeRO-1):
    # gradients are reduce-scattered, updated shards all-gathered as bf16 parameters.
    distributed_optimizer: bool = False
    fsdp: bool = True
    kernels_per_layer: int = 24
    kernel_gap_s: float = 2e-6
    fused_elementwise: bool = True
    # bytes per logit element at the loss's forward peak: bf16 logits + fp32 copy + fp32 softmax/log-softmax kept for
    # backward (10, PyTorch's cross_entropy on .float() logits); Megatron-Core's vocab-parallel cross entropy casts
    # once and then works in place (max, exp, normalise, gradient all on the same fp32 buffer, which it saves for
    # backward: megatron/core/tensor_parallel/cross_entropy.py), so bf16 + fp32 = 6.
    logits_bytes: int = 10
    # ... and at its backward peak, when larger (0: the same): PyTorch's log-softmax backward writes a new fp32
    # gradient beside the saved output and the incoming gradient (4 + 4 + 4 = 12).
    logits_bwd_bytes: int = 0
    # ... with the vocabulary split over tp, when it differs (0: the same): gigafactory's vocab-parallel cross
    # entropy (`parallel.tensor`) saves its fp32 softmax columns and writes the gradient beside them (4 + 4 = 8).
    logits_bwd_bytes_tp: int = 0
    # the pipeline runs DeepSpeed's PipelineEngine `TrainSchedule`: blocking send/recv pairs issued at the start of
    # the step after the compute that produced them (see `blocking_pipeline_time`)
    blocking_pipeline: bool = False
    # HBM bytes the loss moves per logit element, forward + backward, counted op by op. Megatron's vocab-parallel
    # cross entropy (cross_entropy.py): .float() 2+4, max 4, in-place subtract 4+4, in-place exp 4+4, sum 4,
    # in-place normalise 4+4; backward: in-place scale by the loss gradient 4+4, cast back to bf16 4+2 = 52.
    # PyTorch's fused cross_entropy on .float() logits (torchtitan): cast 2+4, log-softmax 4+4+4, backward 4+4+4,
    # cast back 4+2 = 36.
    loss_bytes: int = 52
    # tensor parallelism with sequence parallelism saves the all-gathered (whole-sequence) input of each GEMM after a
    # gather for its weight gradient, as DTensor's SequenceParallel (torchtitan) and gigafactory's `parallel.tensor`
    # do, rather than the sequence shard gathered again in backward (Megatron-LM, Korthikanti et al. 2022 §4.2.2),
    # and the MoE router (which the trainer runs on the gathered sequence) keeps its input.
    saves_gathered: bool = False


# Megatron-LM as used by Narayanan et al. 2021 and Korthikanti et al. 2022 on A100: unfused softmax attention
# (fused scale-mask-softmax kernel, s² scores in HBM), dropout, gradient all-reduce after the backward pass
# (no overlap), blocking TP all-reduces, apex fused kernels.
MEGATRON_2021 = Stack("megatron-2021", flash_attention=False, dp_overlap=0.0, tp_overlap=0.0, dropout=True,
                      fsdp=False, kernels_per_layer=20)
# Megatron-Core r0.8 (2024, the README's H100 table): flash attention (cuDNN/TE), distributed optimizer with
# --overlap-grad-reduce and --overlap-param-gather, TE's TP communication overlap hides about half of TP traffic.
MEGATRON_CORE_2024 = Stack("megatron-core-2024", flash_attention=True, dp_overlap=1.0, tp_overlap=0.5,
                           pp_overlap=0.5, distributed_optimizer=True, fsdp=False, kernels_per_layer=20,
                           logits_bytes=6)
# NeMo / Megatron-Bridge 25.x: Megatron-Core 0.13+ with Transformer Engine, grouped GEMMs for experts, fused
# permutation; EP all-to-all still on the critical path unless --overlap-moe-expert-parallel-comm (not in the
# published recipes we use).
NEMO_2025 = Stack("nemo-2025", flash_attention=True, dp_overlap=1.0, tp_overlap=0.5, pp_overlap=0.5,
                  distributed_optimizer=True, fsdp=False, kernels_per_layer=20, logits_bytes=6)
# Megatron-DeepSpeed 3D parallelism as BLOOM and MT-NLG ran it (2021-22): Megatron's TP and kernels, DeepSpeed's
# pipeline engine, ZeRO-1 over data parallelism (optimizer sharded, gradients reduced after the backward pass),
# unfused softmax attention with dropout. No sequence parallelism (Korthikanti et al., May 2022, came after MT-NLG
# and BLOOM's launch): norms and dropout run on the whole sequence on every tp rank, and the pipeline engine sends
# each tp rank's whole activation (deepspeed/runtime/pipe/engine.py, p2p.py: blocking dist.send / dist.recv).
DEEPSPEED = Stack("deepspeed", flash_attention=False, dp_overlap=0.0, tp_overlap=0.0, pp_overlap=0.0, dropout=True,
                  distributed_optimizer=True, fsdp=False, kernels_per_layer=24, blocking_pipeline=True,
                  sequence_parallel=False)
# DeepSpeed ZeRO-3 (HF Accelerate / DeepSpeed, flash attention): per-layer parameter gathers with prefetch.
DEEPSPEED_ZERO3 = Stack("deepspeed-zero3", flash_attention=True, dp_overlap=1.0, tp_overlap=0.0, pp_overlap=0.0,
                        kernels_per_layer=28)
# torchtitan / FSDP2 (what gigafactory's trainer runs): flash attention (SDPA), FSDP2 prefetch of the next
# layer's gather and overlapped reduce-scatter, async TP hides about half of TP traffic; eager PyTorch launches
# more kernels per layer than the fused frameworks.
# Its loss: gigafactory's model casts the bf16 head output to fp32 inside the model (the bf16 copy dies at the
# cast, unlike torchtitan's, which the caller holds) and scales it, so the forward peak is the fp32 logits and the
# log-softmax (8), the backward's 12 (the dry run measures both, tests/test_dryrun.py).
MODERN = Stack("modern", flash_attention=True, dp_overlap=1.0, tp_overlap=0.5, pp_overlap=0.5, dropout=False,
               distributed_optimizer=True, kernels_per_layer=32, fused_elementwise=False, loss_bytes=36,
               logits_bytes=8, logits_bwd_bytes=12, logits_bwd_bytes_tp=8, saves_gathered=True)
TORCHTITAN = MODERN
STACKS = {s.name: s for s in (MEGATRON_2021, MEGATRON_CORE_2024, NEMO_2025, DEEPSPEED, DEEPSPEED_ZERO3, MODERN)}
# other spellings a validation file may use
STACKS.update({"torchtitan": MODERN, "fsdp2": MODERN, "megatron": MEGATRON_2021, "megatron-lm": MEGATRON_2021,
               "megatron-core": MEGATRON_CORE_2024, "mcore": MEGATRON_CORE_2024, "nemo": NEMO_2025,
               "megatron-bridge": NEMO_2025, "megatron-deepspeed": DEEPSPEED})

# Expert load imbalance: the busiest expert-parallel rank receives this many times the mean tokens. 1.25 is the
# capacity factor GShard and Switch Transformer provision for (Lepikhin et al. 2020; Fedus et al. 2021), and it
# matches Megatron-Core's published Qwen3-235B measurement, 295 TFLOP/s with forced balance against 237 dropless
# (yanring/Megatron-MoE-ModelZoo, best_practice/Qwen3: 1.245). Rows that forced balance use 1.0.
EXPERT_IMBALANCE = 1.25


@dataclass(frozen=True)
class Cluster:
    gpu: GPUSpec
    n_gpus: int
    fabric: FabricSpec
    gpus_per_node: int

    @classmethod
    def of(cls, gpu: GPUSpec, n_gpus: int, fabric: str | FabricSpec = "ib-ndr") -> Cluster:
        fab = get_fabric(fabric) if isinstance(fabric, str) else fabric
        # the NIC rate is the smaller of the GPU's NIC and the fabric's port speed
        if gpu.nic_bw < fab.nic_bw:
            fab = fab.model_copy(update={"nic_gbps": gpu.nic_bw * 8 / 1e9})
        return cls(gpu=gpu, n_gpus=n_gpus, fabric=fab, gpus_per_node=min(gpu.nvlink_domain, n_gpus))


@dataclass
class StepCost:
    layout: Layout
    global_batch_seqs: int
    seq_len: int
    n_micro: int
    step_time_s: float
    compute_s: float
    bubble_s: float
    exposed_comm_s: dict[str, float]
    comm_s: dict[str, float]
    optimizer_s: float
    memory: dict[str, float]
    memory_capacity: float
    model_flops_per_gpu: float
    hw_flops_per_gpu: float
    peak_flops: float
    collective_bytes: dict[str, float]
    notes: list[str] = field(default_factory=list)
    activations_peak: float = 0.0  # the most activation bytes held at any moment (`peak_transients`)
    pp_stage: str = "first"  # the pipeline end `memory` describes (the busier one; "first" when pp = 1)

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch_seqs * self.seq_len / self.step_time_s

    @property
    def model_tflops(self) -> float:
        return self.model_flops_per_gpu / self.step_time_s / 1e12

    @property
    def hw_tflops(self) -> float:
        return self.hw_flops_per_gpu / self.step_time_s / 1e12

    @property
    def mfu(self) -> float:
        return self.model_flops_per_gpu / self.step_time_s / self.peak_flops

    @property
    def hfu(self) -> float:
        return self.hw_flops_per_gpu / self.step_time_s / self.peak_flops

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.memory_total <= self.memory_capacity

    def to_dict(self) -> dict[str, object]:
        return {
            "layout": self.layout.model_dump(),
            "global_batch_seqs": self.global_batch_seqs,
            "seq_len": self.seq_len,
            "micro_batches_per_step": self.n_micro,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "model_tflops_per_gpu": self.model_tflops,
            "hw_tflops_per_gpu": self.hw_tflops,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "time_breakdown_s": {
                "compute": self.compute_s,
                "pipeline_bubble": self.bubble_s,
                "optimizer": self.optimizer_s,
                **{f"exposed_{k}": v for k, v in self.exposed_comm_s.items()},
            },
            "comm_time_s": self.comm_s,
            "memory_bytes": self.memory,
            "memory_total_bytes": self.memory_total,
            "memory_capacity_bytes": self.memory_capacity,
            "collective_bytes_per_rank_per_step": self.collective_bytes,
            "notes": self.notes,
        }


# ---- formulas with hand-checkable forms ----------------------------------------------------------------------
def ring_time(kind: Literal["all_reduce", "all_gather", "reduce_scatter"], nbytes: float, n: int, bw: float,
              latency_s: float = 0.0) -> float:
    """Ring collective over ``n`` ranks of a ``nbytes`` tensor (full size) at ``bw`` bytes/s per rank."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    wire = nbytes * steps / n
    return wire / bw + steps * latency_s


def pipeline_bubble_fraction(pp: int, n_micro: int, virtual: int = 1) -> float:
    """Idle time / ideal time of 1F1B or GPipe, (p−1)/(v·m) (Narayanan et al. 2021, eq. 1 and §2.2.2)."""
    return (pp - 1) / (virtual * n_micro)


def expert_tp(lay: Layout) -> int:
    """Tensor-parallel split of the experts: by FFN columns over tp without expert parallelism; whole experts
    per EP rank (replicated over tp, their gradients summed over tp) when ep > 1, as the trainer runs them."""
    return lay.tp if lay.ep == 1 else 1


# Layers per virtual stage when a run names the interleaved schedule but not its virtual stages: NVIDIA's
# published Megatron-Core / NeMo recipes chunk each pipeline rank into virtual stages of about two layers (Llama 3
# 70B: pp 8, vp 5, 80 layers; Llama 3.1 405B: pp 8, vp 8, 126 layers; GPT-3 175B: pp 8, vp 6, 96 layers;
# Megatron-Bridge scripts/performance recipes). Megatron-LM itself has no default (--num-layers-per-virtual-
# pipeline-stage must be given), so this is the stated assumption for such rows.
LAYERS_PER_VIRTUAL_STAGE = 2


def default_virtual_stages(n_layers: int, pp: int) -> int:
    """Virtual stages per pipeline rank for an interleaved run that does not state them: chunks of
    `LAYERS_PER_VIRTUAL_STAGE` layers (at least two chunks, since interleaving needs v > 1)."""
    per_rank = math.ceil(n_layers / pp)
    return max(2, min(per_rank, round(per_rank / LAYERS_PER_VIRTUAL_STAGE)))


def bubble_slots(lay: Layout) -> float:
    """Idle micro-batch slots of the schedule the trainer runs: (p−1)/v for GPipe, 1F1B and interleaved 1F1B;
    a third of that for zero-bubble (Qi et al. 2024, ZB-H1: the weight-gradient third of each backward fills
    the warm-up and cool-down bubbles, with 1F1B's peak memory)."""
    slots = (lay.pp - 1) / lay.pp_virtual
    return slots / 3 if lay.pp_schedule == "zero_bubble" else slots


def deepspeed_train_schedule(pp: int, n_micro: int, stage: int) -> list[tuple[str, int]]:
    """The instruction order of DeepSpeed's pipeline `TrainSchedule` (deepspeed/runtime/pipe/schedule.py) for one
    stage, as (kind, micro-batch): 2(m + p − 1) steps alternating forward and backward by the parity of step and
    stage; a step first exchanges with its neighbours (forward step: receive this micro-batch's activation, send
    the previous step's input gradient; backward step: send the previous step's activation, receive this
    micro-batch's output gradient), then computes."""
    ops: list[tuple[str, int]] = []
    prev = -1
    first, last = stage == 0, stage == pp - 1
    for t in range(2 * (n_micro + pp - 1)):
        forward = t % 2 == stage % 2
        half = t // 2 if t % 2 == 0 else (t - 1) // 2
        if forward:
            mb = half - stage // 2
        else:
            mb = half - pp + (stage + 1) // 2 if t % 2 == 0 else half - pp + 1 + stage // 2
        ok, prev_ok = 0 <= mb < n_micro, 0 <= prev < n_micro
        if forward:
            ops += [("recv_act", mb)] * (ok and not first) + [("send_grad", prev)] * (prev_ok and not first)
            ops += [("F", mb)] * ok
        else:
            ops += [("send_act", prev)] * (prev_ok and not last) + [("recv_grad", mb)] * (ok and not last)
            ops += [("B", mb)] * ok
        prev = mb
    return ops


_PEER = {"send_act": ("recv_act", 1), "recv_act": ("send_act", -1), "send_grad": ("recv_grad", -1),
         "recv_grad": ("send_grad", 1)}


@functools.lru_cache(maxsize=256)
def blocking_pipeline_time(pp: int, n_micro: int, fwd: float, bwd: float, transfer: float) -> float:
    """Makespan of `deepspeed_train_schedule` on every stage when each send/recv blocks until its peer arrives
    (DeepSpeed's p2p: the send and the matching receive both wait, then the transfer takes ``transfer``) and a
    stage's forward/backward of one micro-batch take ``fwd`` / ``bwd``. With ``transfer`` = 0 this is 1F1B's
    (m + p − 1)(f + b); each transfer sits on the critical path, since the compute waits for it."""
    ops = [deepspeed_train_schedule(pp, n_micro, s) for s in range(pp)]
    at, clock = [0] * pp, [0.0] * pp
    pending = sum(map(len, ops))
    while pending:
        moved = False
        for s in range(pp):
            while at[s] < len(ops[s]):
                kind, mb = ops[s][at[s]]
                if kind in ("F", "B"):
                    clock[s] += fwd if kind == "F" else bwd
                    at[s], pending, moved = at[s] + 1, pending - 1, True
                    continue
                peer_kind, step = _PEER[kind]
                q = s + step
                if at[q] >= len(ops[q]) or ops[q][at[q]] != (peer_kind, mb):
                    break
                clock[s] = clock[q] = max(clock[s], clock[q]) + transfer
                at[s], at[q], pending, moved = at[s] + 1, at[q] + 1, pending - 2, True
        if not moved:
            raise RuntimeError("DeepSpeed schedule deadlocked (a bug in deepspeed_train_schedule)")
    return max(clock)


def korthikanti_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1,
                                 recompute: str = "none", sequence_parallel: bool = True) -> float:
    """Activation bytes of one GPT layer (Korthikanti et al. 2022, Table 2), 16-bit, with dropout."""
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1)
    attn_scores = 0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return s * b * h / t * (34 + attn_scores)
    return s * b * h * (10 + 24 / t + attn_scores / t)


def state_bytes_per_param(shard: int, mode: Literal["ddp", "zero1", "zero2", "fsdp"] = "fsdp") -> float:
    """Persistent bytes per parameter under mixed-precision Adam with fp32 master weights and fp32 gradients.

    Components: bf16 working weights 2, fp32 gradients 4, fp32 master weights 4, Adam m and v 8.
    ddp: nothing sharded (18). zero1 (Megatron distributed optimizer): master + Adam sharded (6 + 12/d).
    zero2: gradients too (2 + 16/d). fsdp (ZeRO-3 / FSDP2): everything sharded, the bf16 copy is only gathered
    per layer on the fly (16/d; the transient gather is counted separately).
    """
    d = max(shard, 1)
    if mode == "ddp":
        return 18.0
    if mode == "zero1":
        return 6 + 12 / d
    if mode == "zero2":
        return 2 + 16 / d
    return 16 / d


def state_split(shard: int, optimizer_shard: int = 1) -> dict[str, float]:
    """`state_bytes_per_param` split into weights / gradients / optimizer: fsdp when shard > 1, else ddp, or
    zero1 over ``optimizer_shard`` ranks (fp32 master weights count with the optimizer there)."""
    if shard <= 1 and optimizer_shard > 1:
        return {"weights": 2.0, "gradients": 4.0, "optimizer": 12 / optimizer_shard}
    if shard <= 1:
        return {"weights": 6.0, "gradients": 4.0, "optimizer": 8.0}
    return {"weights": 4 / shard, "gradients": 4 / shard, "optimizer": 8 / shard}


# ---- model pieces per GPU ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Parts:
    """Parameter counts split by how they are sharded (from ModelSpec, not re-derived)."""

    layer_dense: int  # per layer: attention, router, dense FFN, norms
    layer_expert: int  # per layer: all experts
    embed: int
    head: int


def _parts(spec: ModelSpec) -> _Parts:
    layer_expert = spec.n_experts * spec.expert_params
    layer_dense = spec.layer_params(spec.n_experts) - layer_expert
    return _Parts(layer_dense, layer_expert, spec.embedding_params, spec.head_params)


def _embed_params_on_stage(parts: _Parts, pp: int) -> int:
    """Embedding/head parameters on the busiest stage. With pp > 1 a tied head keeps its own copy on the last
    stage (Megatron-LM does the same), so the largest of the two ends counts; with pp = 1 a tied matrix is one."""
    if pp > 1:
        return max(parts.embed, parts.head or parts.embed)
    return parts.embed + parts.head


# GEMM tiles cuBLAS/CUTLASS pick from (rows × cols of the output per thread block) and the fraction of the
# best tile's per-SM rate each reaches: smaller tiles re-read operands more often. Tile and wave quantization as
# in NVIDIA's "Matrix Multiplication Background User's Guide" (Deep Learning Performance docs): the output is cut
# into tiles, tiles run in waves of one per SM, and a partial last wave or partial tiles waste the rest.
_TILES = ((256, 128, 1.0), (128, 128, 0.9), (128, 64, 0.75), (64, 64, 0.55))
_K_HALF = 64  # the k at which the main loop's prologue/epilogue costs as much as the loop (k/(k+64))


def gemm_shape_efficiency(m: float, n: float, k: float, sms: int) -> float:
    """Fraction of the large-GEMM rate an (m×k)·(k×n) GEMM reaches: best tile's wave × tile efficiency × k term."""
    best = 0.0
    for tm, tn, rate in _TILES:
        tiles = math.ceil(m / tm) * math.ceil(n / tn)
        waves = math.ceil(tiles / sms)
        useful = m * n / (waves * sms * tm * tn)
        best = max(best, rate * useful)
    return best * k / (k + _K_HALF)


def _gemm_time(m: float, n: float, k: float, gpu: GPUSpec, count: float = 1.0, fp8: bool = False) -> float:
    """Time of ``count`` (m×k)·(k×n) GEMMs: max(FLOPs at the shape's rate, operand bytes at HBM bandwidth).

    FP8 (Transformer Engine): operands 1 byte, FP8 peak × FP8 MAMF, output bf16; the bf16→fp8 casts of the
    activation operand are charged as elementwise traffic (read 2, write 1 byte per element)."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    flops = 2 * m * n * k
    shape = gemm_shape_efficiency(m, n, k, gpu.sms)
    bw = gpu.hbm_eff * gpu.hbm_bw
    if fp8 and gpu.fp8_dense_flops:
        rate = gpu.fp8_matmul_eff * gpu.sustained_eff * gpu.fp8_dense_flops * shape
        nbytes = m * k + k * n + 2 * m * n
        cast = 3 * m * k / bw
    else:
        rate = gpu.matmul_eff * gpu.sustained_eff * gpu.bf16_dense_flops * shape
        nbytes = 2 * (m * k + k * n + m * n)
        cast = 0.0
    return count * (max(flops / rate, nbytes / bw) + cast)


# HBM bytes per element that eager PyTorch moves, counted op by op in the forward pass (backward: twice that, as
# for every elementwise term here). RMSNorm in fp32 as torchtitan and gigafactory's model write it,
# x.float() → pow → mean → rsqrt·x → ·weight → .to(bf16): 2+4, 4+4, 4, 4+4, 4+4, 4+2 = 40 bytes per element
# (fused: read 2, write 2). RoPE on q and k in fp32 (float cast, rotate, two products, add, cast back): ~24 bytes per
# q/k element (fused into the attention prologue: 0). Gated activation silu(a)·b as two ops: 2+2, 4+2 = 10 bytes
# per FFN element (fused: 6).
EAGER_BYTES = {"norm": 40, "rope": 24, "gated_act": 10}
FUSED_BYTES = {"norm": 4, "rope": 0, "gated_act": 6}


@dataclass(frozen=True)
class _LayerTime:
    fwd: float  # forward compute time of one layer for one micro-batch
    bwd: float
    recompute: float  # extra forward work redone in backward
    attn_fwd_flops: float  # attention-core FLOPs of the forward (full square, as ModelSpec counts)


def _layer_time(spec: ModelSpec, lay: Layout, gpu: GPUSpec, stack: Stack, seq: int, fp8: bool = False,
                imbalance: float = EXPERT_IMBALANCE, capacity_factor: float | None = None) -> _LayerTime:
    return _layer_time_cached(spec, lay.tp, lay.cp, lay.ep, lay.micro_batch, lay.recompute, gpu, stack, seq, fp8,
                              imbalance if spec.n_experts > 1 else 1.0, capacity_factor)


def routed_rows_per_token(spec: ModelSpec, tokens: float, capacity_factor: float | None) -> float:
    """Rows the MoE dispatch moves per token when a rank dispatches `tokens` tokens: top_k dropless, else the
    expert slots with their padding, n_experts·C / tokens ≈ top_k · capacity factor (`specs.moe`)."""
    if tokens <= 0:
        return float(spec.top_k)
    return dispatched_rows(tokens, spec.top_k, spec.n_experts, capacity_factor) / tokens


@functools.lru_cache(maxsize=4096)
def _layer_time_cached(spec: ModelSpec, tp: int, cp: int, ep: int, micro_batch: int, recompute: str,
                       gpu: GPUSpec, stack: Stack, seq: int, fp8: bool, imbalance: float,
                       capacity_factor: float | None = None) -> _LayerTime:
    lay = Layout(tp=tp, cp=cp, ep=ep, micro_batch=micro_batch, recompute=recompute)  # type: ignore[arg-type]
    t = lay.tp
    T = lay.micro_batch * seq / lay.cp  # tokens on this rank (context parallel splits the sequence)
    h = spec.d_model
    q = spec.n_heads * spec.head_dim
    kv = spec.n_kv_heads * spec.head_dim
    heads = spec.n_heads / t
    sp = t if stack.sequence_parallel else 1
    gemm = _gemm_time(T, (q + 2 * kv) / t, h, gpu, fp8=fp8) + _gemm_time(T, h, q / t, gpu, fp8=fp8)
    gemm += _gemm_time(T, spec.n_experts, h, gpu)  # router (replicated, bf16/fp32)
    # routed experts: ep·T·k tokens land on the E experts of the EP group; each GPU holds E/ep of them, and the
    # busiest GPU gets `imbalance` × the mean (everyone waits for it at the combine). With a capacity factor every
    # expert runs exactly its ep·C slots, padding included, and no rank is busier than another.
    rows = routed_rows_per_token(spec, T / (sp if lay.ep > 1 else 1), capacity_factor)
    m_e = lay.ep * T * (spec.top_k * imbalance if capacity_factor is None else rows) / spec.n_experts
    f = spec.expert_ffn / t
    local_experts = spec.n_experts / lay.ep
    gemm += _gemm_time(m_e, f, h, gpu, 2 * local_experts, fp8) + _gemm_time(m_e, h, f, gpu, local_experts, fp8)
    if spec.dense_ffn:
        fd = spec.dense_ffn / t
        gemm += _gemm_time(T, fd, h, gpu, 2, fp8) + _gemm_time(T, h, fd, gpu, fp8=fp8)
    # attention core: QKᵀ and AV over the full key length
    attn_flops = 4 * T * seq * heads * spec.head_dim
    bw = gpu.hbm_eff * gpu.hbm_bw
    if stack.flash_attention:
        # causal: the kernel skips the upper triangle; attn_eff is measured fwd+bwd, so split 1:2.5 (FA2/FA3)
        attn_total = 0.5 * attn_flops * 3.5 / (gpu.attn_eff * gpu.sustained_eff * gpu.bf16_dense_flops)
        attn_fwd, attn_bwd = attn_total / 3.5, attn_total * 2.5 / 3.5
        scores_bytes = 0.0
    else:
        b_heads = lay.micro_batch * heads
        per = _gemm_time(T / lay.micro_batch, seq, spec.head_dim, gpu, b_heads)
        attn_fwd = 2 * per
        attn_bwd = 2 * attn_fwd
        # scale+mask+softmax fused (read 2 B, write 2 B per score), dropout (read 2, write 2, mask 1)
        scores_bytes = T * seq * heads * (4 + (5 if stack.dropout else 0))
    # elementwise bytes per token, forward: norms read+write 4h each, residual add 6h (+3h dropout),
    # activation functions read their inputs and write the output (gated: 2 in 1 out per routed copy).
    norms = spec.norm_params_per_layer // h
    eb = FUSED_BYTES if stack.fused_elementwise else EAGER_BYTES
    token_bytes = (norms * eb["norm"] * h + 2 * (6 + (3 if stack.dropout else 0)) * h) / sp
    token_bytes += eb["gated_act"] * (rows * spec.expert_ffn + spec.dense_ffn) / t
    token_bytes += eb["rope"] * (q + kv) / t
    elem = (T * token_bytes + scores_bytes) / bw
    perm_fwd, perm_bwd = permutation_bytes(spec, stack, lay.ep, local_experts, rows)
    gaps = stack.kernels_per_layer * stack.kernel_gap_s
    fwd = gemm + attn_fwd + elem + T * perm_fwd / sp / bw + gaps
    bwd = 2 * gemm + attn_bwd + 2 * elem + T * perm_bwd / sp / bw + 2 * gaps
    if lay.recompute == "full":
        rec = fwd
    elif lay.recompute == "selective" and stack.flash_attention:
        # Megatron-Core --recompute-modules moe_act layernorm: the FFN activation functions and the norms
        # are redone in backward (elementwise traffic only)
        rec = T * (eb["gated_act"] * (rows * spec.expert_ffn + spec.dense_ffn) / t
                   + norms * eb["norm"] * h / sp) / bw
    elif lay.recompute == "selective":
        rec = attn_fwd + scores_bytes / bw
    else:
        rec = 0.0
    return _LayerTime(fwd, bwd, rec, attn_flops)


# Token permutation around the experts, counted kernel by kernel as passes over the routed copies (k per token,
# h wide, bf16: 2h bytes each time a copy is read or written) and over the tokens themselves. Megatron-Core's
# all-to-all dispatcher (megatron/core/transformer/moe/token_dispatcher.py) with --moe-permute-fusion (Transformer
# Engine's fused permute kernels, what NeMo's recipes set): "permutation 1" gathers each token's copies into
# expert order (read the token, write k copies), the all-to-all, then "permutation 2" (`sort_chunks_by_idxs`,
# read + write every received copy) regroups them from source-rank order to local-expert order whenever a rank
# holds more than one expert; after the experts the same two in reverse (unsort: read + write; unpermute: read the
# copies, weight them by their probabilities and sum into the token: write the token). Backward runs the mirror
# passes and the unpermute's probability gradient reads the experts' forward outputs again (one more copy read).
# gigafactory's trainer (eager PyTorch, `MoE.dispatch_compute` and `parallel.expert.ep_dispatch_compute`): the
# gather `x[token_of]` reads and writes each copy, the re-sort after the all-to-all and the `index_copy` back
# read + write each copy, the gate product reads + writes each copy, and `index_add_` reads each copy and
# reads + writes its destination row (3 touches) into a zeroed output (1 token write); backward: `index_select`
# of the gradient 2, the product's two gradients 4, the re-sorts 4, and the gather's backward, an `index_add_`
# into zeros, 3 + 1 token write.
# With a capacity factor (`MoE.capacity_dispatch`) the same passes run over every expert slot, padding included:
# n_experts·C rows instead of top_k per token (`routed_rows_per_token`).
# Touches per forward / backward: (copies, tokens, extra copies when re-sorting by local expert).
PERMUTE_TOUCHES = {True: ((2, 2), (3, 2), 4), False: ((7, 1), (9, 1), 4)}


def permutation_bytes(spec: ModelSpec, stack: Stack, ep: int, local_experts: float,
                      rows_per_token: float | None = None) -> tuple[float, float]:
    """HBM bytes per token (on the whole sequence; the caller divides by sequence parallelism) that an MoE layer's
    token permutation moves in forward and in backward (`PERMUTE_TOUCHES`): the re-sort by local expert runs
    only after an all-to-all (ep > 1) that lands on more than one local expert. `rows_per_token`: routed rows
    per token (default top_k; with a capacity factor, the padded slots of `routed_rows_per_token`)."""
    if spec.n_experts <= 1:
        return 0.0, 0.0
    (cf, tf), (cb, tb), resort = PERMUTE_TOUCHES[stack.fused_elementwise]
    sort = resort if ep > 1 and local_experts > 1 else 0
    rows = spec.top_k if rows_per_token is None else rows_per_token
    copy, token = 2 * rows * spec.d_model, 2 * spec.d_model
    return (cf + sort) * copy + tf * token, (cb + sort) * copy + tb * token


def layer_activation_bytes(spec: ModelSpec, lay: Layout, stack: Stack, seq: int, fp8: bool = False,
                           capacity_factor: float | None = None) -> float:
    """Activation bytes one layer keeps for one micro-batch on one GPU (Korthikanti et al. generalised). Under FP8,
    Transformer Engine keeps the FP8 cast of each GEMM's input for the weight gradient (1 byte, not 2). With a
    capacity factor the experts keep their padded slots too (`routed_rows_per_token`)."""
    t = lay.tp
    sp = t if stack.sequence_parallel else 1
    T = lay.micro_batch * seq / lay.cp
    h = spec.d_model
    q = spec.n_heads * spec.head_dim
    kv = spec.n_kv_heads * spec.head_dim
    if lay.recompute == "full":
        return 2 * T * h / sp
    norms = spec.norm_params_per_layer // h
    drop = 1 if stack.dropout else 0
    gemm_in = 1 if fp8 else 2  # bytes per element of a saved GEMM input
    # a GEMM input behind the sequence-parallel gather: whole-sequence when the stack saves the gathered tensor
    gathered = 1 if stack.saves_gathered else sp
    # Selective recompute under flash attention is Megatron-Core's --recompute-modules moe_act + layernorm: the
    # norms and activation functions are redone in backward. Megatron frees their outputs even where the next GEMM
    # saves them (CheckpointWithoutOutput); eager PyTorch (torch.utils.checkpoint) drops only what the
    # recomputed op itself keeps, its consumer's saved input stays.
    selective = lay.recompute == "selective" and stack.flash_attention
    frees_outputs = selective and stack.fused_elementwise
    per_tok = norms * 2 * h / sp  # norm inputs
    per_tok += drop * 2 * h / sp  # attention-output and MLP dropout masks
    if not frees_outputs:  # the QKV input: the first norm's output (or its gather)
        per_tok += gemm_in * h / gathered
    per_tok += (2 * q + 4 * kv + gemm_in * q) / t  # Q, K, V, output-projection input
    if stack.flash_attention:
        per_tok += 4 * spec.n_heads / t  # softmax log-sum-exp (fp32)
    elif lay.recompute != "selective":
        per_tok += 5 * spec.n_heads * seq / t  # scores, softmax, dropout mask + output (Korthikanti 5as/h)
    # gated FFNs: input copy, gate and up outputs, activation, product (2h + 8f per routed copy).
    # Fused kernels keep the gate and up outputs and the product (the down projection's input): 6 bytes per gated
    # element, which for a two-matrix GELU FFN of width F = 1.5 f is Korthikanti's 4F (fc1 output, GELU output).
    # Eager PyTorch also keeps the activation's output (gelu(a) for the product's backward): 8. Selective recompute
    # drops the activation's output, and Megatron the product too (4); eager keeps the product (6).
    ffn_per = 6 if stack.fused_elementwise else 8
    if selective:
        ffn_per = 4 if frees_outputs else 6
    ffn_per -= 2 - gemm_in  # the product is the down projection's GEMM input
    # Routed copies: experts split by tp (no expert parallelism) each see every token of the sequence, whole
    # experts (ep > 1) only this rank's sequence shard. Each copy's input, and its output, which the gate product's
    # backward needs (the gates' gradient).
    rows = routed_rows_per_token(spec, T / (sp if lay.ep > 1 else 1), capacity_factor)
    copy_div = sp if expert_tp(lay) == 1 else 1
    if spec.n_experts > 1:
        per_tok += rows * ((gemm_in + 2) * h / copy_div + ffn_per * spec.expert_ffn / t)
    else:
        per_tok += rows * (gemm_in * h / gathered + ffn_per * spec.expert_ffn / t)  # a dense MLP
    if spec.dense_ffn:
        per_tok += ffn_per * spec.dense_ffn / t
        if stack.saves_gathered and t > 1:  # its own gather's output (without tp: the router's input below)
            per_tok += gemm_in * h
    if spec.n_experts > 1:
        per_tok += 4 * spec.n_experts / sp  # router probabilities (fp32)
        if stack.saves_gathered:  # the router's (bf16) input, which it reads in fp32: the whole sequence under tp
            per_tok += 2 * h
    return T * per_tok


def in_flight_microbatches(lay: Layout, n_micro: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at its peak."""
    if lay.pp == 1:
        return 1.0
    if lay.pp_schedule == "gpipe":
        return float(n_micro)
    if lay.pp_virtual > 1:  # interleaved, or zero-bubble over several stages per rank (its ZB1P keeps 1F1B's order)
        # Korthikanti et al. 2022 §4.2.3: interleaving needs (1 + (p−1)/(p·v)) × the 1F1B memory
        return min(float(n_micro), lay.pp * (1 + (lay.pp - 1) / (lay.pp * lay.pp_virtual)))
    return float(min(lay.pp, n_micro))


def in_flight_last_stage(lay: Layout, n_micro: int) -> float:
    """Micro-batches whose activations the last pipeline stage holds at its peak: one under 1F1B (each forward is
    followed by its backward); interleaved, Megatron-LM's warm-up (core/pipeline_parallel/schedules.py:
    (p − rank − 1)·2 + (v − 1)·p model chunks) leaves the last rank (v−1)·p + 1 chunks of 1/v of its layers."""
    if lay.pp == 1:
        return 1.0
    if lay.pp_schedule == "gpipe":
        return float(n_micro)
    if lay.pp_virtual > 1:
        return min(float(n_micro), ((lay.pp_virtual - 1) * lay.pp + 1) / lay.pp_virtual)
    return 1.0


# ---- collectives ------------------------------------------------------------------------------------------
def collective_bytes(
    spec: ModelSpec,
    layout: Layout,
    global_batch_seqs: int,
    seq_len: int,
    dtype_bytes: int = 2,
    grad_bytes: int = 4,
    reshard_after_forward: bool = True,
    sequence_parallel: bool = True,
    router_grads_over_tp: bool = False,
    pp_rank: int | None = None,
    root_gathers: tuple[int, int] = (1, 1),
    capacity_factor: float | None = None,
    distributed_optimizer: bool = True,
) -> dict[str, float]:
    """Payload bytes per rank per optimizer step of each collective (see docs/plan.md for the convention).

    all_gather = bytes of the gathered output tensor; reduce_scatter = bytes of the input tensor; all_reduce =
    tensor bytes; all_to_all = input tensor bytes; send_recv = bytes sent. Assumptions (FSDP2 / torchtitan):
    parameters are gathered in forward and again in backward when ``reshard_after_forward`` (one gather per
    micro-batch otherwise, and always for the root unit's embedding/head, which FSDP2 does not reshard);
    gradients are reduce-scattered after every micro-batch (once per step under a pipeline schedule) in
    ``grad_bytes`` precision; HSDP all-reduces the sharded gradient over dp_replicate once per step. Replicated
    data parallelism (`Layout.dp_mode` ``zero1``) with a ``distributed_optimizer``: the parameters are gathered
    and the gradients reduce-scattered over dp_replicate once per step; without, the gradients are all-reduced.
    Figures are
    for the busiest rank
    (a middle pipeline stage holding the largest share of layers). Under tensor parallelism the weights every tp
    rank holds whole (norms) see only this rank's sequence slice, so their gradients are all-reduced over tp in
    every backward (Megatron-LM does this for its norms under sequence parallelism); the vocabulary is split over
    tp (`vocab_parallel_bytes`); ``router_grads_over_tp`` adds the fp32 gate gradients gigafactory's trainer sums
    over tp.
    Point-to-point bytes (and a tied embedding's gradient sum) are those of pipeline rank ``pp_rank``, or their
    average over the pipeline ranks when it is None.
    ``root_gathers``: how many times the first and the last pipeline stage are gathered whole per step, their
    FSDP root (embedding, head) with them (once, unless the schedule evicts stages: `parallel.pipeline.
    stage_unshards`, which needs torch and is passed in by the trainer's comparison, `parallel.compare`).
    With ``capacity_factor`` the expert all-to-all moves every expert's padded slots
    (`specs.moe.dispatched_rows`), not the routed copies.
    """
    lay = layout
    dp = lay.dp
    if global_batch_seqs % (dp * lay.micro_batch):
        raise ValueError("global batch must be a multiple of dp × micro_batch")
    n_micro = global_batch_seqs // (dp * lay.micro_batch)
    parts = _parts(spec)
    layers = math.ceil(spec.n_layers / lay.pp)
    embed_stage = _embed_params_on_stage(parts, lay.pp)
    emb_tp = lay.tp
    dense_local = layers * parts.layer_dense / lay.tp + embed_stage / emb_tp
    expert_local = layers * parts.layer_expert / (expert_tp(lay) * lay.ep)
    out: dict[str, float] = {k: 0.0 for k in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv")}
    shard = lay.dp_shard * lay.cp
    if shard > 1:
        gathers = 2 if reshard_after_forward else 1
        exp_shard = shard // lay.ep
        gathered = dense_local + (expert_local if exp_shard > 1 else 0.0)
        # FSDP2 keeps the root unit (embedding, head, final norm) unsharded from forward to backward
        # (reshard_after_forward=None means False for the root), so it is gathered once per micro-batch.
        root = embed_stage / emb_tp
        if lay.pp > 1:
            # Under a pipeline schedule FSDP keeps a stage's parameters gathered from one backward until the next
            # forward has run (torch.distributed.pipelining sets reshard_after_backward=False between
            # micro-batches): each layer is gathered n_micro + 1 times per step, the root once.
            # The root's own gathers: `root_gathers` (first stage on pp rank 0, last on pp rank pp − 1; the
            # busier when no rank is given).
            ends = root_gathers
            gathers = (max(ends) if pp_rank is None else ends[0] if pp_rank == 0
                       else ends[1] if pp_rank == lay.pp - 1 else 1)
            out["all_gather"] += ((n_micro + 1) * (gathered - root) + gathers * root) * dtype_bytes
        else:
            out["all_gather"] += n_micro * (gathers * (gathered - root) + root) * dtype_bytes
        # reduce-scattered after every micro-batch (the trainer keeps no unsharded gradient between them); a
        # pipeline schedule reduces once per step (torch.distributed.pipelining syncs only the last backward)
        out["reduce_scatter"] += (1 if lay.pp > 1 else n_micro) * gathered * grad_bytes
        if lay.dp_replicate > 1:
            out["all_reduce"] += (dense_local / shard + expert_local / max(exp_shard, 1)) * grad_bytes
    elif lay.dp_mode == "zero1" and distributed_optimizer:
        out["all_gather"] += (dense_local + expert_local) * dtype_bytes
        out["reduce_scatter"] += (dense_local + expert_local) * grad_bytes
    elif lay.dp_replicate > 1:
        out["all_reduce"] += (dense_local + expert_local) * grad_bytes
    T = lay.micro_batch * seq_len / lay.cp
    h = spec.d_model
    act = T * h * dtype_bytes  # one full-sequence activation of this rank
    if lay.tp > 1:
        replicated = layers * spec.norm_params_per_layer + spec.d_model
        # The hooks reduce whole gradients over tp before FSDP reduce-scatters them (measured: not divided by dp),
        # in the dtype of the gathered working weights (bf16 under mixed precision: FSDP casts to fp32 only for
        # its own reduction; the dry run measured 0.58 of the planner when this counted fp32).
        out["all_reduce"] += n_micro * replicated * dtype_bytes
        # the embedding runs on the first pipeline stage (pp rank 0), the head on the last (pp rank pp − 1)
        first, last = (1 / lay.pp,) * 2 if pp_rank is None else (float(pp_rank == 0), float(pp_rank == lay.pp - 1))
        for kind, nbytes in vocab_parallel_bytes(T, h, dtype_bytes, first, last, sequence_parallel).items():
            out[kind] += n_micro * nbytes
        if router_grads_over_tp:
            out["all_reduce"] += n_micro * layers * lay.micro_batch * seq_len / lay.cp * spec.top_k * 4
        passes = 2 + (1 if lay.recompute == "full" else 0)  # fwd, bwd (+ recomputed fwd)
        # attention and the FFN block each gather their input and reduce-scatter their output, per pass; with
        # whole experts (ep > 1) the MoE gathers its input for the router only (forward passes; its backward
        # reduce-scatters that input's gradient) and keeps its output on this rank's tokens.
        # A dense FFN beside the MoE (grok-2) is split by tp as a block of its own.
        split_blocks = (1 if lay.ep > 1 else 2) + (1 if spec.dense_ffn else 0)
        n = n_micro * layers * split_blocks * passes
        if sequence_parallel:
            out["all_gather"] += n * act
            out["reduce_scatter"] += n * act
        else:
            out["all_reduce"] += n * act
        if lay.ep > 1:
            out["all_gather"] += n_micro * layers * (passes - 1) * act
            out["reduce_scatter"] += n_micro * layers * act
            # whole experts on every tp rank, each fed its own tokens: their gradients (this rank's FSDP shard)
            # are summed over tp once per step
            out["all_reduce"] += expert_local / max(1, shard // lay.ep) * grad_bytes
    if lay.ep > 1:
        tokens = T / (lay.tp if sequence_parallel else 1)  # each tp rank dispatches its own sequence slice
        rows = dispatched_rows(tokens, spec.top_k, spec.n_experts, capacity_factor)
        # dispatch and combine in forward and again in backward (+ forward again under full recompute)
        passes = 2 + (1 if lay.recompute == "full" else 0)
        out["all_to_all"] += n_micro * layers * 2 * passes * rows * h * dtype_bytes
    if lay.cp > 1:
        kv_bytes = T * 2 * spec.n_kv_heads * spec.head_dim / lay.tp * dtype_bytes  # this rank's K and V
        fwd = 1 + (1 if lay.recompute == "full" else 0)
        # Llama 3's all-gather context parallelism: every forward gathers all cp ranks' K and V per layer, the
        # backward reduce-scatters their gradients; once per forward of each stage the key positions (int64)
        # and padding flags (1 byte) of the whole sequence are gathered for the mask.
        out["all_gather"] += n_micro * layers * fwd * lay.cp * kv_bytes
        out["all_gather"] += n_micro * lay.pp_virtual * lay.micro_batch * seq_len * 9
        out["reduce_scatter"] += n_micro * layers * lay.cp * kv_bytes
        if spec.n_experts > 1:  # per-sequence balance statistics (routed counts, mean probabilities) over cp
            out["all_reduce"] += n_micro * layers * fwd * 2 * lay.micro_batch * spec.n_experts * 4
    if lay.pp > 1:
        boundary = act / (lay.tp if sequence_parallel else 1)
        # Each of a rank's pp_virtual stages sends its activations forward and its input gradients back, except
        # the very first stage (no gradient back) and the very last (no activation forward): `ends` is how many
        # of those two this rank holds (on average over the pp ranks, 2/pp).
        ends = 2 / lay.pp if pp_rank is None else float(pp_rank == 0) + float(pp_rank == lay.pp - 1)
        out["send_recv"] += n_micro * (2 * lay.pp_virtual - ends) * boundary
        if spec.tie_embeddings:  # the first and last stage sum their embedding copies' gradient shards
            zero1 = lay.dp_mode == "zero1" and distributed_optimizer  # sharded over dp_replicate
            out["all_reduce"] += ends * parts.embed / emb_tp / (lay.dp_replicate if zero1 else max(1, shard)) * \
                grad_bytes
    return {k: v for k, v in out.items() if v}


def vocab_parallel_bytes(tokens: float, d_model: int, dtype_bytes: int, first: float = 1.0, last: float = 1.0,
                         sequence_parallel: bool = True) -> dict[str, float]:
    """One micro-batch's tp traffic of the vocabulary split (Megatron-LM's vocab-parallel embedding, head and cross
    entropy; `parallel.tensor`) for `tokens` tokens of this rank's sequence before the tp split. The embedding sums
    the ranks' partial lookups (reduce-scatter to sequence shards; its backward all-gathers the gradient); the
    head all-gathers the final norm's output (reduce-scatter in backward); the loss all-reduces a max, a sum of
    exponentials and the target logit per token in fp32. `first` / `last`: how much of the embedding's / the
    head's work this rank does (pipeline stages: 1 or 0, or 1/pp on average)."""
    act = tokens * d_model * dtype_bytes
    loss = 3 * tokens * 4 * last
    if not sequence_parallel:
        return {"all_reduce": (first + last) * act + loss}
    return {"all_gather": (first + last) * act, "reduce_scatter": (first + last) * act, "all_reduce": loss}


# ---- the step ---------------------------------------------------------------------------------------------
TREE_BW_FACTOR = 0.92


def level_alpha(span_gpus: int, cluster: Cluster) -> tuple[float, float]:
    """(alpha per step, bandwidth factor) of a group whose members spread over ``span_gpus`` consecutive GPUs."""
    fab = cluster.fabric
    if span_gpus <= cluster.gpus_per_node:
        return fab.alpha_nvlink_s, 1.0
    if span_gpus <= fab.leaf_gpus:
        return fab.latency_s, 1.0
    if span_gpus <= fab.pod_gpus:
        return fab.alpha_spine_s, 1.0
    return fab.alpha_core_s, 1.0 / fab.core_oversubscription


def collective_time(kind: Literal["all_reduce", "all_gather", "reduce_scatter"], nbytes: float, n: int,
                    in_node: int, cluster: Cluster, stride: int = 1) -> float:
    """One NCCL collective call of a ``nbytes`` tensor (full size) over ``n`` ranks, ``in_node`` of them per node,
    members ``stride`` GPUs apart. Hierarchical: a ring over NVLink inside the node, then the node's NICs in
    parallel (each carries 1/in_node of the data) across nodes, every step paying the alpha of the highest level
    the group spans. NCCL picks ring or double binary tree for all-reduce (the faster: the tree's latency grows
    with log2 of the nodes, the ring's linearly); all-gather and reduce-scatter are ring-only."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    gpu, fab = cluster.gpu, cluster.fabric
    g = max(1, min(in_node, n))
    nodes = max(1, n // g)
    t = ring_time(kind, nbytes, g, gpu.nvlink_bw * gpu.nvlink_eff, fab.alpha_nvlink_s)
    if nodes > 1:
        alpha, taper = level_alpha(n * stride, cluster)
        bw = fab.nic_bw * fab.efficiency * taper
        ring = ring_time(kind, nbytes / g, nodes, bw, alpha)
        if kind == "all_reduce":
            # NCCL's tuning model gives the tree 92 % of the ring's bus bandwidth for all-reduce
            # (src/graph/tuning.cc), so large messages on few nodes stay on the ring
            tree_bw = TREE_BW_FACTOR * bw
            tree = 2 * (nodes - 1) / nodes * nbytes / g / tree_bw + 2 * math.ceil(math.log2(nodes)) * alpha
            ring = min(ring, tree)
        t += ring
    return t


def _hier_time(kind: Literal["all_reduce", "all_gather", "reduce_scatter"], nbytes: float, n: int, in_node: int,
               cluster: Cluster, stride: int = 1) -> float:
    return collective_time(kind, nbytes, n, in_node, cluster, stride)


def _chain_exposed(comm: float, compute: float, layers: int, overlap: float) -> float:
    """Exposed time of a per-layer chain: the transfer for layer i+1 runs during layer i's compute (a budget of
    ``overlap`` × that compute); the first transfer of the chain never hides."""
    if comm <= 0:
        return 0.0
    return comm + max(0, layers - 1) * max(0.0, comm - overlap * compute)


def estimate(
    spec: ModelSpec,
    layout: Layout,
    cluster: Cluster,
    global_batch_seqs: int,
    seq_len: int,
    stack: Stack = MODERN,
    with_bytes: bool = True,
    fp8: bool = False,
    expert_imbalance: float = EXPERT_IMBALANCE,
    capacity_factor: float | None = None,
) -> StepCost:
    """Predict one optimizer step. ``global_batch_seqs`` must be a multiple of dp × micro_batch.
    ``capacity_factor``: the trainer's ``moe_capacity_factor`` (None = dropless dispatch)."""
    lay = layout
    gpu = cluster.gpu
    dp = lay.dp
    n_micro = max(1, global_batch_seqs // (dp * lay.micro_batch))
    parts = _parts(spec)
    layers = math.ceil(spec.n_layers / lay.pp)  # layers of the busiest stage
    T = lay.micro_batch * seq_len / lay.cp
    per_node = cluster.gpus_per_node
    fab = cluster.fabric
    nv_bw = gpu.nvlink_bw * gpu.nvlink_eff
    nic_bw = fab.nic_bw * fab.efficiency
    notes: list[str] = []

    # ---- compute per micro-batch on the slowest stage
    lt = _layer_time(spec, lay, gpu, stack, seq_len, fp8, expert_imbalance, capacity_factor)
    head = _gemm_time(T, spec.vocab_size / lay.tp, spec.d_model, gpu)
    head_t = 3 * head + T * spec.vocab_size / lay.tp * stack.loss_bytes / (gpu.hbm_eff * gpu.hbm_bw)
    layer_t = lt.fwd + lt.bwd + lt.recompute
    stage_layers_t = layers * layer_t + head_t  # the last stage also runs the head

    # ---- per-micro-batch communication inside the stage, per call (per layer, per pass)
    act = T * spec.d_model * 2
    comm: dict[str, float] = {}
    exposed: dict[str, float] = {}
    passes = 2 + (1 if lay.recompute == "full" else 0)
    if lay.tp > 1:
        tp_bw = nv_bw if lay.tp <= per_node else nic_bw
        one = ring_time("all_reduce", act, lay.tp, tp_bw, fab.alpha_nvlink_s if lay.tp <= per_node else fab.latency_s)
        comm["tp"] = n_micro * layers * 2 * passes * one
        exposed["tp"] = comm["tp"] * (1 - stack.tp_overlap)
    if lay.ep > 1:
        sp = lay.tp if stack.sequence_parallel else 1
        imb = expert_imbalance if spec.n_experts > 1 and capacity_factor is None else 1.0
        send = routed_rows_per_token(spec, T / sp, capacity_factor) * act / sp * (lay.ep - 1) / lay.ep * imb
        ep_in_node = max(1, min(lay.ep, per_node // min(lay.tp, per_node)))
        off = (lay.ep - ep_in_node) / lay.ep / ((lay.ep - 1) / lay.ep)
        alpha, _ = level_alpha(lay.ep * lay.tp, cluster)
        one = max(send * (1 - off) / nv_bw, send * off / nic_bw) + alpha * math.log2(lay.ep)
        comm["ep"] = n_micro * layers * 2 * passes * one
        exposed["ep"] = comm["ep"] * (1 - stack.ep_overlap)
    if lay.cp > 1:
        kv = T * 2 * spec.n_kv_heads * spec.head_dim / lay.tp * 2
        cp_in_node = per_node // min(lay.tp, per_node) >= lay.cp
        # all-gather of K/V (forward), reduce-scatter of their gradients (backward): cp−1 chunks each way
        one = (lay.cp - 1) * kv / (nv_bw if cp_in_node else nic_bw)
        attn_t = lt.attn_fwd_flops / (gpu.attn_eff * gpu.bf16_dense_flops)
        cp_passes = 2 + (1 if lay.recompute == "full" else 0)
        comm["cp"] = n_micro * layers * cp_passes * one
        # the gather of the next layer's K/V can run behind this layer's attention
        exposed["cp"] = n_micro * layers * cp_passes * max(0.0, one - attn_t)
    if lay.pp > 1:
        sp = lay.tp if stack.sequence_parallel else 1
        alpha, _ = level_alpha(cluster.n_gpus // lay.pp * 2, cluster)
        pp_one = act / sp / nic_bw + alpha
        comm["pp"] = n_micro * lay.pp_virtual * 2 * pp_one
        exposed["pp"] = comm["pp"] * (1 - stack.pp_overlap)

    inner_exposed = sum(exposed.values())
    mb_time = stage_layers_t + inner_exposed / n_micro
    slots = n_micro + bubble_slots(lay)
    compute_s = n_micro * stage_layers_t
    bubble_s = (slots - n_micro) * mb_time
    pipe_s = slots * mb_time
    if stack.blocking_pipeline and lay.pp > 1 and lay.pp_virtual == 1:
        # DeepSpeed's TrainSchedule run step by step: the tp/ep/cp traffic a micro-batch exposes goes with its
        # compute (a third forward, two thirds backward), every activation/gradient transfer blocks both ends
        inner = stage_layers_t + (inner_exposed - exposed["pp"]) / n_micro
        fwd = (layers * lt.fwd + head) / stage_layers_t * inner
        pipe_s = blocking_pipeline_time(lay.pp, n_micro, fwd, inner - fwd, pp_one)
        bubble_s = (lay.pp - 1) * inner
        exposed["pp"] = pipe_s - (n_micro + lay.pp - 1) * inner

    # ---- data parallel: FSDP per layer per micro-batch, or Megatron-style once per step
    shard = lay.dp_shard * lay.cp
    layers_local = layers
    embed_stage = _embed_params_on_stage(parts, lay.pp)
    dense_local = (layers_local * parts.layer_dense + embed_stage) / lay.tp
    # Megatron-style stacks fold expert parallelism over tp × dp with whole experts (ETP = 1); `validate` models
    # that as ep/tp groups of tp-split experts: the same expert weights, FLOPs and tokens per GPU.
    etp = expert_tp(lay) if stack.fsdp else lay.tp
    expert_local = layers_local * parts.layer_expert / (etp * lay.ep)
    local_params = dense_local + expert_local
    tp_in = min(lay.tp, per_node)
    dp_in_node = max(1, per_node // tp_in)
    exp_shard = max(1, shard // lay.ep)
    layer_mb_t = (lt.fwd, lt.bwd + lt.recompute)  # compute a layer's transfer can hide behind, fwd and bwd
    zero1 = stack.fsdp and stack.distributed_optimizer and lay.dp_mode == "zero1"
    if stack.fsdp:
        fsdp = _fsdp_comm(parts, lay, cluster, stack, shard, exp_shard, dp_in_node, layers_local, embed_stage)
        # zero1: gathered once per step (the first micro-batch's forward) and kept through every backward
        gathering = 1 if zero1 else n_micro
        comm["fsdp_gather"] = gathering * fsdp["gather_mb"]
        comm["dp_grads"] = fsdp["grads"]
        ov = stack.dp_overlap
        fwd_exp = _chain_exposed(fsdp["gather_layer"], layer_mb_t[0], layers_local, ov)
        bwd_gather = fsdp["gather_layer"] if stack.reshard_after_forward and not zero1 else 0.0
        bwd_exp = _chain_exposed(bwd_gather, layer_mb_t[1], layers_local, ov)
        last_bwd = _chain_exposed(bwd_gather + fsdp["grads_layer"], layer_mb_t[1], layers_local, ov)
        exposed["fsdp_gather"] = gathering * (fwd_exp + fsdp["root"]) + (n_micro - 1) * bwd_exp
        exposed["dp_grads"] = last_bwd
        if lay.pp == 1 and n_micro > 1:  # the earlier micro-batches reduce-scatter too, behind their backward
            comm["dp_grads"] += (n_micro - 1) * fsdp["rs"]
            rs_bwd = _chain_exposed(bwd_gather + fsdp["rs_layer"], layer_mb_t[1], layers_local, ov)
            exposed["dp_grads"] += (n_micro - 1) * (rs_bwd - bwd_exp)
    else:
        dp_t, ag_t = _megatron_dp_comm(lay, cluster, stack, local_params, shard, dp_in_node, expert_local,
                                       exp_shard)
        comm["dp_grads"] = dp_t
        comm["fsdp_gather"] = ag_t
        mb_bwd = layers_local * layer_mb_t[1]
        mb_fwd = layers_local * layer_mb_t[0]
        edge = 1 / max(layers_local, 1)  # the last bucket's reduction (first layer's gather) never hides
        ov = stack.dp_overlap
        exposed["dp_grads"] = max(dp_t * edge, dp_t - ov * mb_bwd) if ov else dp_t
        exposed["fsdp_gather"] = max(ag_t * edge, ag_t - ov * mb_fwd) if ov else ag_t
    if lay.ep > 1 and lay.tp > 1 and etp == 1:  # whole experts: gradient shards summed over tp once per step
        tp_bw = nv_bw if lay.tp <= per_node else nic_bw
        etp_t = ring_time("all_reduce", expert_local / exp_shard * stack.grad_reduce_bytes, lay.tp, tp_bw, 3e-6)
        comm["dp_grads"] += etp_t
        exposed["dp_grads"] += etp_t  # after the last backward, before the optimizer

    # ---- optimizer: Adam streams fp32 master, grads, m, v (read 16 B, write 12 B) + bf16 copy (2 B)
    dist_opt = zero1 or (not stack.fsdp and stack.distributed_optimizer)
    opt_shard = (lay.dp_replicate * (1 if stack.fsdp else shard)) if dist_opt else 1
    fsdp_shard = shard if stack.fsdp else 1
    fsdp_exp_shard = exp_shard if stack.fsdp else 1
    opt_exp_shard = opt_shard // lay.ep if (not stack.fsdp and dist_opt) else opt_shard
    opt_params = dense_local / fsdp_shard / opt_shard + expert_local / fsdp_exp_shard / max(1, opt_exp_shard)
    optimizer_s = opt_params * 30 / (gpu.hbm_eff * gpu.hbm_bw)

    step = pipe_s + exposed["fsdp_gather"] + exposed["dp_grads"] + optimizer_s
    # ---- FLOPs per GPU (model flops from ModelSpec; hardware adds recomputed forward work)
    tokens = global_batch_seqs * seq_len
    model_flops = spec.flops_per_token(seq_len) * tokens / cluster.n_gpus
    layer_fwd_flops_per_tok = 2 * (spec.matmul_params_active - spec.embedding_params) + \
        spec.attention_flops_per_token(seq_len) / 3
    if lay.recompute == "full":
        extra = layer_fwd_flops_per_tok
    elif lay.recompute == "selective" and not stack.flash_attention:
        extra = spec.attention_flops_per_token(seq_len) / 3
    else:
        extra = 0.0
    hw_flops = model_flops + extra * tokens / cluster.n_gpus

    # ---- memory on the busiest GPU at its busiest moment
    mem = {k: dense_local * v for k, v in state_split(fsdp_shard, opt_shard).items()}
    for k, v in state_split(fsdp_exp_shard, max(1, opt_exp_shard)).items():
        mem[k] += expert_local * v
    if zero1 and n_micro == 1 and lay.pp == 1:
        # FSDP2 reduce-scatters each unit's gradient as soon as its backward has made it: without micro-batches
        # to accumulate over, no whole fp32 gradient is ever held (Megatron's main-grad buffer always is)
        mem["gradients"] = local_params * stack.grad_reduce_bytes / opt_shard
    elif zero1 and lay.pp_schedule == "interleaved" and lay.pp_virtual > 1 and n_micro <= lay.pp:
        # torch's interleaved schedule runs micro-batches in rounds of pp, one stage's whole round at a time: with
        # one round, a stage (an FSDP root) has run all its backwards, and reduce-scattered, before the next
        # stage's first. One stage's whole fp32 gradient is held at a time, beside the shards of those done: at
        # most the stage with the embedding (the first pipeline rank's, done last), as the dry run measured.
        layer_local = parts.layer_dense / lay.tp + parts.layer_expert / (etp * lay.ep)
        chunk = layers_local / lay.pp_virtual * layer_local + embed_stage / lay.tp
        mem["gradients"] = (chunk + (local_params - chunk) / opt_shard) * stack.grad_reduce_bytes
    transient, act_peak, pp_stage = peak_transients(spec, lay, stack, seq_len, n_micro, fsdp_shard > 1, fp8,
                                                    capacity_factor)
    mem.update(transient)
    capacity = gpu.hbm_bytes * 0.92 - 1 * GIB  # CUDA context, NCCL buffers, allocator fragmentation
    if lay.pp > 1 and n_micro < lay.pp:
        notes.append(f"only {n_micro} micro-batches for {lay.pp} stages: the pipeline is mostly bubble")

    cb = collective_bytes(spec, lay, n_micro * dp * lay.micro_batch, seq_len,
                          grad_bytes=stack.grad_reduce_bytes, reshard_after_forward=stack.reshard_after_forward,
                          sequence_parallel=stack.sequence_parallel,
                          capacity_factor=capacity_factor,
                          distributed_optimizer=stack.distributed_optimizer) if with_bytes else {}
    return StepCost(
        layout=lay, global_batch_seqs=n_micro * dp * lay.micro_batch, seq_len=seq_len, n_micro=n_micro,
        step_time_s=step, compute_s=compute_s, bubble_s=bubble_s, exposed_comm_s=exposed, comm_s=comm,
        optimizer_s=optimizer_s, memory=mem, memory_capacity=capacity, model_flops_per_gpu=model_flops,
        hw_flops_per_gpu=hw_flops, peak_flops=gpu.bf16_dense_flops, collective_bytes=cb, notes=notes,
        activations_peak=act_peak, pp_stage=pp_stage,
    )


def logit_bytes(spec: ModelSpec, stack: Stack, tp: int = 1) -> tuple[float, float]:
    """Bytes per logit element the loss holds at its forward and at its backward peak (`tp` > 1: the
    vocab-parallel loss). Eager PyTorch's soft-cap c·tanh(x/c) keeps tanh's fp32 output for its backward, 4 more
    in both (grok-2: measured by the dry run)."""
    cap = 4 if spec.final_softcap and not stack.fused_elementwise else 0
    bwd = stack.logits_bwd_bytes_tp if tp > 1 and stack.logits_bwd_bytes_tp else stack.logits_bwd_bytes
    return stack.logits_bytes + cap, max(stack.logits_bytes, bwd) + cap


def peak_transients(spec: ModelSpec, lay: Layout, stack: Stack, seq_len: int, n_micro: int, fsdp: bool,
                    fp8: bool = False, capacity_factor: float | None = None) -> tuple[dict[str, float], float, str]:
    """What one GPU holds besides its parameter/gradient/optimizer state at the step's busiest moment, as
    (``gathered_weights``, ``activations``, ``logits``), the most activation bytes held at any moment, and which
    pipeline end that busiest moment is on (``first`` or ``last``; ``first`` without a pipeline).

    The busiest moment is one of two, never both (the dry run measured each): the loss's backward (the saved
    activations of every layer, the logits' fp32 buffers) or a layer's backward (the saved activations, that
    layer's rebuilt ones under full recompute, and FSDP's copies of this layer's weights, the next layer's,
    prefetched, this layer's bf16 gradient, 6 bytes per parameter of a layer, and the fp32 reduce-scatter input of
    the unit reduced before it, which FSDP2 keeps until the next unit's reduction; then, its activations freed,
    the reduce-scatter of its last FSDP unit, which adds that unit's fp32 gradient buffer). The root unit (embedding,
    head) stays gathered (bf16) from its forward to the end of the backward, plus the head's bf16 gradient once
    the head's backward has run (an untied embedding's comes after the layers'). With pipeline stages the first
    stage holds the most micro-batches, the last the logits: both ends are checked."""
    parts = _parts(spec)
    layers = math.ceil(spec.n_layers / lay.pp)
    T = lay.micro_batch * seq_len / lay.cp
    act_layer = layer_activation_bytes(spec, lay, stack, seq_len, fp8, capacity_factor)
    rebuilt = 0.0
    if lay.recompute == "full":
        full = lay.model_copy(update={"recompute": "none"})
        rebuilt = layer_activation_bytes(spec, full, stack, seq_len, fp8, capacity_factor)  # rebuilt in backward
    fwd_b, bwd_b = logit_bytes(spec, stack, lay.tp)
    logit_elems = T * spec.vocab_size / lay.tp
    # the final norm's saved tensors, per token and model dimension: its bf16 input and output, and eagerly also
    # the fp32 copy and the fp32 normalised values (2 + 4 + 4 + 2)
    final_norm = T * spec.d_model / (lay.tp if stack.sequence_parallel else 1) * (4 if stack.fused_elementwise else 12)
    root = _embed_params_on_stage(parts, lay.pp) / lay.tp * 2 if fsdp else 0.0
    # during a layer's backward the root's bf16 gradient exists for the head's matrix only (the embedding's comes
    # at the very end; a tied matrix gets the head's part first): the last stage's
    head_grad = (parts.head or parts.embed) / lay.tp * 2 if fsdp else 0.0
    layer = (parts.layer_dense / lay.tp + parts.layer_expert / (lay.ep * expert_tp(lay))) * 2 if fsdp else 0.0
    # the FSDP unit whose gradients a layer's backward reduces last, after its activations are gone: the whole
    # layer, or its dense part when the experts are a unit of their own (ep > 1)
    unit = layer if lay.ep == 1 else parts.layer_dense / lay.tp * 2 * fsdp
    # Besides its own weights and bf16 gradient, a layer's backward holds the layer before it, prefetched, and
    # the fp32 input of the reduce-scatter of the unit after it: FSDP2 keeps the last reduce-scatter's input
    # until the next unit's post-backward (`reduce_scatter_max_input_buffers`, 1). A middle layer has both
    # neighbours; with two layers each has one.
    prefetched, held = layer, 2 * unit
    around = prefetched + held if layers > 2 else max(prefetched, held) if layers == 2 else 0.0
    ends = [in_flight_last_stage(lay, n_micro)] + ([in_flight_microbatches(lay, n_micro)] if lay.pp > 1 else [])
    phases = []
    for i, in_flight in enumerate(ends):
        saved = layers * act_layer * in_flight
        if i == 0:  # the last stage's loss
            phases.append({"gathered_weights": root, "activations": saved + final_norm,
                           "logits": logit_elems * bwd_b})
        grad = head_grad if i == 0 else 0.0
        phases.append({"gathered_weights": root + grad + 2 * layer + around, "activations": saved + rebuilt,
                       "logits": 0.0})
        # its reduce-scatter: FSDP2 reshards the unit, then casts its bf16 gradient into an fp32 buffer (2 + 4
        # bytes per parameter) while the next layer is already gathered (prefetched)
        phases.append({"gathered_weights": root + grad + layer + 3 * unit, "activations": saved, "logits": 0.0})
    at = max(range(len(phases)), key=lambda k: sum(phases[k].values()))
    busiest = phases[at]
    end = "last" if lay.pp > 1 and at < 3 else "first"  # the last stage's three phases come first
    act_peak = max(layers * act_layer * in_flight + max(rebuilt, final_norm + logit_elems * fwd_b if i == 0 else 0.0)
                   for i, in_flight in enumerate(ends))
    return busiest, act_peak, end


def _fsdp_comm(parts: _Parts, lay: Layout, cluster: Cluster, stack: Stack, shard: int, exp_shard: int,
               dp_in_node: int, layers: int, embed_stage: int) -> dict[str, float]:
    """FSDP2 calls per layer (one FSDP unit per layer): the bf16 gather of a layer's dense and expert shards, the
    fp32 reduce-scatter of its gradients (+ the HSDP all-reduce over dp_replicate, once per step), and the root
    unit's gather. ``rs``: the reduce-scatters alone, which every micro-batch runs. A distributed optimizer
    (`Layout.dp_mode` ``zero1``): the bf16 gather and the fp32 reduce-scatter of each layer over dp_replicate,
    once per step (the caller counts the gather once)."""
    t = lay.tp
    inner = min(t, cluster.gpus_per_node)
    in_node = min(shard, dp_in_node)
    exp_in = min(exp_shard, in_node)
    dense_l, expert_l = parts.layer_dense / t, parts.layer_expert / (expert_tp(lay) * lay.ep)
    gb = stack.grad_reduce_bytes
    gather = 0.0
    rs = 0.0
    if lay.dp_mode == "zero1" and stack.distributed_optimizer:
        n, in_node = lay.dp_replicate, min(lay.dp_replicate, dp_in_node)
        gather = collective_time("all_gather", (dense_l + expert_l) * 2, n, in_node, cluster, inner)
        grads = collective_time("reduce_scatter", (dense_l + expert_l) * gb, n, in_node, cluster, inner)
        root = embed_stage / t
        root_t = collective_time("all_gather", root * 2, n, in_node, cluster, inner)
        root_rs = collective_time("reduce_scatter", root * gb, n, in_node, cluster, inner)
        return {"gather_layer": gather, "grads_layer": grads, "root": root_t, "rs_layer": 0.0,
                "gather_mb": layers * gather + root_t, "grads": layers * grads + root_rs, "rs": 0.0}
    if shard > 1:
        gather = collective_time("all_gather", dense_l * 2, shard, in_node, cluster, inner)
        gather += collective_time("all_gather", expert_l * 2, exp_shard, exp_in, cluster, inner * lay.ep)
        rs = collective_time("reduce_scatter", dense_l * gb, shard, in_node, cluster, inner)
        rs += collective_time("reduce_scatter", expert_l * gb, exp_shard, exp_in, cluster, inner * lay.ep)
    grads = rs
    if lay.dp_replicate > 1:
        rep_in = max(1, dp_in_node // shard)
        stride = inner * shard
        grads += collective_time("all_reduce", (dense_l / shard + expert_l / exp_shard) * gb, lay.dp_replicate,
                                 rep_in, cluster, stride)
    root = embed_stage / t
    root_t = collective_time("all_gather", root * 2, shard, in_node, cluster, inner) if shard > 1 else 0.0
    root_rs = collective_time("reduce_scatter", root * gb, shard, in_node, cluster, inner) if shard > 1 else 0.0
    gathers = 2 if stack.reshard_after_forward else 1
    return {"gather_layer": gather, "grads_layer": grads, "root": root_t, "rs_layer": rs,
            "gather_mb": gathers * layers * gather + root_t, "grads": layers * grads + root_rs,
            "rs": layers * rs + root_rs}


def _megatron_dp_comm(lay: Layout, cluster: Cluster, stack: Stack, local_params: float, shard: int,
                      dp_in_node: int, expert_local: float, exp_shard: int) -> tuple[float, float]:
    """Megatron-style data parallelism over all dp ranks, once per step, in buckets of one layer each: the
    gradient reduce-scatter (distributed optimizer) or all-reduce, and the bf16 parameter all-gather."""
    dp = lay.dp
    if dp <= 1:
        return 0.0, 0.0
    inner = min(lay.tp, cluster.gpus_per_node)
    in_node = min(dp, dp_in_node)
    gb = stack.grad_reduce_bytes
    dense = local_params - expert_local
    exp_dp = max(1, dp // lay.ep)

    def bucketed(kind: Literal["all_reduce", "all_gather", "reduce_scatter"], params: float, nbytes: float, n: int,
                 stride: int) -> float:
        # Megatron-Core buckets max(40M, 1M·dp) parameters per call (distributed_data_parallel_config.py)
        calls = max(1, math.ceil(params / max(40e6, 1e6 * n)))
        return calls * collective_time(kind, nbytes / calls, n, min(n, in_node), cluster, stride)

    if stack.distributed_optimizer:
        rs = bucketed("reduce_scatter", dense, dense * gb, dp, inner)
        rs += bucketed("reduce_scatter", expert_local, expert_local * gb, exp_dp, inner * lay.ep)
        ag = bucketed("all_gather", dense, dense * 2, dp, inner)
        ag += bucketed("all_gather", expert_local, expert_local * 2, exp_dp, inner * lay.ep)
        return rs, ag
    ar = bucketed("all_reduce", dense, dense * gb, dp, inner)
    ar += bucketed("all_reduce", expert_local, expert_local * gb, exp_dp, inner * lay.ep)
    return ar, 0.0
