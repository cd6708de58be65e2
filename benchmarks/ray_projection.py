"""A paper projection of the Ray runtime's GRPO design to 8 GPUs (one node) and 64 GPUs (8 nodes), put together
from the pieces measured on one and two H200s (issue 18, item 3). Nothing here ran on 4, 8 or 64 GPUs: every
projected number is arithmetic on the committed measurements and on the link bandwidths stated in `Links`.

    python benchmarks/ray_projection.py                      # reads and writes benchmarks/results/
    python benchmarks/ray_projection.py --results DIR --out DIR

Reads (from --results):
    ray_scaling.json            1.5B shape, 2 x H200: a local 1 GPU, b colocated FSDP2 x2, b_ds colocated
                                DeepSpeed ZeRO-3 x2, c split 1 engine GPU + 1 learner GPU
    grpo_benchmark.json         0.5B shape, one GRPO iteration on one H200 (local runtime)
    gen_matrix_winnow_v2.json   7B shape, generation alone on one H200 (no 7B learner step was measured)
Writes ray_projection.json, ray_projection.md and (unless --no-plot, with matplotlib) ray_projection.png to --out.

The design projected is the one `winnow/distributed/` runs: a synchronous loop whose driver sends each engine
replica a contiguous shard of the prompts, gathers every completion, scores them and computes the advantages,
then puts the whole batch in Ray's object store for every learner rank (each takes its own rows). Colocated:
N workers, each an engine replica and an FSDP2 / ZeRO-3 rank; every rank gathers the full weights (one
parameter at a time) and copies them into its own engine. Split: N/2 replicas and N/2 learner ranks; rank 0
gathers the weights and broadcasts them in buckets to every replica over NCCL. The workload is weak scaling
at the 2-GPU run's work per GPU: 256 samples per GPU (8 GPUs: 256 prompts x 8; 64 GPUs: 2048 prompts x 8),
128-token prompts, 512 new tokens, micro-batch 32. The formulas are in `project`; each piece's source is in
`measured_pieces`. At 2 GPUs and the 1.5B shape the projection must give back the 2-GPU measurement
(`calibration`, checked by tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

GPU_COUNTS = (2, 8, 64)
CASES = (("colocated", "fsdp2"), ("colocated", "deepspeed"), ("split", "fsdp2"))
SAMPLES_PER_GPU = 256
"""the 2-GPU colocated run's work per GPU (64 prompts x 8 samples over 2 GPUs), kept at every GPU count"""
BATCH_BYTES_PER_TOKEN = 8 + 8 + 4 + 4
"""a TrainBatch row per token: input_ids and attention_mask (int64), response_mask and engine_logprobs (fp32)"""
SYNC_BUCKET_BYTES = 256 * 2**20
"""--sync.bucket-mb's default: the broadcast's bucket size (each bucket is 3 broadcasts: length, header, data)"""
GATHER_BUCKET_BYTES = 256 * 2**20
"""winnow.learner.fsdp.GATHER_BUCKET_BYTES: full parameters FSDP2 gathers in one all-gather"""


@dataclass(frozen=True)
class Links:
    """Bandwidths and latencies the projection assumes; none was measured on more than one node."""

    nvlink_gbps: float = 450.0
    """GB/s per GPU per direction inside a node: H200 SXM NVLink, 900 GB/s bidirectional (NVIDIA H200 datasheet)"""
    ib_gbps: float = 50.0
    """GB/s per GPU between nodes: 400 Gb/s InfiniBand NDR, one NIC per GPU (typical HGX H200 cluster)"""
    collective_efficiency: float = 0.8
    """share of the link a large-message NCCL ring all-gather / reduce-scatter / broadcast reaches (assumed,
    typical of nccl-tests bus bandwidth)"""
    nvlink_hop_s: float = 3e-6
    """latency of one ring step over NVLink (assumed, nccl-tests small-message figures)"""
    ib_hop_s: float = 10e-6
    """latency of one ring step over InfiniBand (assumed, nccl-tests small-message figures)"""
    ray_object_gbps: float = 2.0
    """GB/s at which Ray's object store moves the batch from the driver's node to another node (assumed;
    not measured: a 1 GB ray.get across two nodes would measure it)"""
    gpus_per_node: int = 8

    def collective_gbps(self, num_gpus: int) -> float:
        """Bandwidth per GPU of a ring over `num_gpus`: NVLink inside one node, else the NIC bounds it."""
        link = self.nvlink_gbps if num_gpus <= self.gpus_per_node else self.ib_gbps
        return link * self.collective_efficiency

    def hop_s(self, num_gpus: int) -> float:
        return self.nvlink_hop_s if num_gpus <= self.gpus_per_node else self.ib_hop_s


@dataclass(frozen=True)
class Shape:
    """A Qwen2.5 shape's sizes, counted from its config (no model built)."""

    name: str
    num_params: int
    num_tensors: int
    """parameter tensors: what the weight sync gathers one `full_tensor()` at a time"""
    root_params: int
    """FSDP2's root unit (embedding, final norm, untied head): gathered before the first layer and reduced after
    the last, so its traffic does not overlap compute"""


def shape_from_config(name: str, cfg: dict) -> Shape:
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden  # q, k, v with biases; o
    layer = attention + 3 * hidden * inter + 2 * hidden  # + gate, up, down; two RMSNorms
    root = vocab * hidden * (1 if cfg["tie_word_embeddings"] else 2) + hidden
    num_tensors = 12 * cfg["num_hidden_layers"] + 2 + (0 if cfg["tie_word_embeddings"] else 1)
    return Shape(name, layer * cfg["num_hidden_layers"] + root, num_tensors, root)


def shapes() -> dict[str, Shape]:
    import generate_shapes  # the 1.5B and 7B shapes the GPU runs used

    configs = {"0.5b": json.loads((HERE / "qwen25_05b_config.json").read_text()), **generate_shapes.SHAPES}
    return {name: shape_from_config(name, cfg) for name, cfg in configs.items()}


@dataclass(frozen=True)
class Piece:
    """One measured number the projection is built from."""

    value: float
    unit: str
    source: str
    """the file, case and field it is read from, and the arithmetic"""


def measured_pieces(results: Path, all_shapes: dict[str, Shape], links: Links) -> dict[str, Piece]:
    scaling = json.loads((results / "ray_scaling.json").read_text())
    cases = {c["case"]: c for c in scaling["cases"]}
    a, b, b_ds, c = (cases[k] for k in ("a", "b", "b_ds", "c"))
    w = scaling["workload"]
    n, tokens = w["num_sequences"], w["trained_tokens"]
    p15 = all_shapes["1.5b"]
    gather = (c["phases_median_s"]["generate"] - a["phases_median_s"]["generate"]) / n
    copy = a["sync_s"] / a["sync_bytes"]
    pieces = {
        "gather_s_per_sample": Piece(gather, "s", "ray_scaling c.generate - a.generate, / 512 samples: the driver "
                                     "receiving and unpickling one replica's completions through Ray"),
        "score_s_per_sample_first_runs": Piece(a["phases_median_s"]["score"] / n, "s", "ray_scaling a.score / 512"),
        "advantages_s_per_sample_first_runs": Piece(a["phases_median_s"]["advantages"] / n, "s",
                                         "ray_scaling a.advantages / 512 (group baselines, the padded batch)"),
        "copy_s_per_byte": Piece(copy, "s", "ray_scaling a.sync_s / a.sync_bytes: learner-to-engine copy on one GPU"),
        "wake_s": Piece(b["phases_median_s"]["sync"] - b["sync_s"], "s", "ray_scaling b: sync phase - sync_s "
                        "(the engines' wake-up, timed in the sync phase)"),
        "broadcast_gbps": Piece(c["sync_bytes"] / c["sync_s"] / 1e9, "GB/s", "ray_scaling c.sync_bytes / c.sync_s: "
                                "NCCL broadcast in 256 MiB buckets, one receiver over NVLink"),
        "ds_extra_train_s": Piece(b_ds["phases_median_s"]["train"] - b["phases_median_s"]["train"], "s",
                                  "ray_scaling b_ds.train - b.train: ZeRO-3's extra per step over FSDP2 on the "
                                  "same work (hooks, unfused AdamW)"),
        "fsdp2_sync_bytes_per_param": Piece(b["sync_bytes"] / p15.num_params, "B", "ray_scaling b.sync_bytes / "
                                            "1.54B parameters (fp32: the sync sends the master weights)"),
        "ds_sync_bytes_per_param": Piece(b_ds["sync_bytes"] / p15.num_params, "B", "ray_scaling b_ds.sync_bytes / "
                                         "1.54B parameters (bf16)"),
        "learner_tflops_1.5b": Piece(6 * p15.num_params * tokens / a["phases_median_s"]["train"] / 1e12, "TFLOP/s",
                                     "ray_scaling a: 6 x params x 327,680 trained tokens / a.train"),
        "generate_512_s_1.5b": Piece(a["phases_median_s"]["generate"], "s", "ray_scaling a.generate (512 rows)"),
        "one_gpu_samples_per_s_1.5b": Piece(a["samples_per_s"], "samples/s", "ray_scaling a: the local runtime"),
    }
    for key, case in (("fsdp2", b), ("ds", b_ds)):
        over_link = case["sync_bytes"] / 2 / (links.collective_gbps(2) * 1e9)
        per_tensor = (case["sync_s"] - copy * case["sync_bytes"] - over_link) / p15.num_tensors
        pieces[f"{key}_gather_s_per_tensor"] = Piece(
            per_tensor, "s", f"ray_scaling {case['case']}: (sync_s - copy - bytes/2 over NVLink) / "
            f"{p15.num_tensors} tensors: one gather of one parameter")
    bucketed = _case(results / "ray_scaling_w2_bucketed.json", "w2")
    num_bytes = bucketed["sync_bytes"]
    over_link = num_bytes / 2 / (links.collective_gbps(2) * 1e9)
    buckets = math.ceil(num_bytes / GATHER_BUCKET_BYTES)
    pieces["fsdp2_gather_s_per_bucket"] = Piece(
        (bucketed["sync_s"] - copy * num_bytes - over_link) / buckets, "s",
        f"ray_scaling_w2_bucketed: (sync_s - copy - bytes/2 over NVLink) / {buckets} buckets: one all-gather of "
        "~256 MiB of shards, 2 ranks")
    pieces["fsdp2_bucketed_sync_bytes_per_param"] = Piece(num_bytes / p15.num_params, "B",
                                                          "ray_scaling_w2_bucketed sync_bytes / 1.54B (bf16)")
    gen_256 = b["phases_median_s"]["generate"] - gather * n
    pieces["rows_256_over_512"] = Piece(gen_256 / a["phases_median_s"]["generate"], "", "ray_scaling (b.generate - "
                                        "gather of 512) / a.generate: a replica's 256 rows against 512, 1.5B")
    w4 = _case(results / "ray_scaling_weak.json", "w4")  # the most samples one driver has handled, newer code
    for phase in ("score", "advantages"):
        pieces[f"{phase}_s_per_sample"] = Piece(
            w4["phases_median_s"][phase] / w4["samples_per_iteration"], "s",
            f"ray_scaling_weak w4.{phase} / {w4['samples_per_iteration']} (4 GPUs, the driver as built now)")
    pieces.update(other_shape_pieces(results))
    run7 = _case(results / "ray_scaling_7b.json", "b")  # 7B, colocated FSDP2 on 2 GPUs, micro-batches of 4 rows
    p7, tokens7 = all_shapes["7b"], run7["samples_per_iteration"] // 2 * (w["prompt_len"] + w["new_tokens"])
    pieces["learner_tflops_7b"] = Piece(6 * p7.num_params * tokens7 / run7["phases_median_s"]["train"] / 1e12,
                                        "TFLOP/s", "ray_scaling_7b b: 6 x params x 163,840 tokens a rank / train "
                                        "(2 FSDP2 ranks, micro-batches of 4 rows: 32 do not fit beside the engine)")
    pieces["generate_256_s_7b"] = Piece(run7["phases_median_s"]["generate"] - gather * run7["samples_per_iteration"],
                                        "s", "ray_scaling_7b b: generate - gather of 512: a replica's 256 rows")
    return pieces


def _case(path: Path, name: str) -> dict:
    return next(c for c in json.loads(path.read_text())["cases"] if c["case"] == name)


def other_shape_pieces(results: Path) -> dict[str, Piece]:
    grpo = json.loads((results / "grpo_benchmark.json").read_text())
    gen7 = json.loads((results / "gen_matrix_winnow_v2.json").read_text())
    row7 = next(r for r in gen7["rows"] if r["shape"] == "7b" and r["workload"] == "fixed")
    return {
        "generate_512_s_0.5b": Piece(grpo["phases"]["generate"]["winnow_s"], "s",
                                     "grpo_benchmark winnow generate (512 rows, one H200)"),
        "learner_tflops_0.5b": Piece(grpo["rates"]["learner_model_tflops"]["winnow"], "TFLOP/s",
                                     "grpo_benchmark winnow learner_model_tflops"),
        "one_gpu_samples_per_s_0.5b": Piece(
            grpo["workload"]["num_sequences"] / grpo["phases"]["end_to_end"]["winnow_s"], "samples/s",
            "grpo_benchmark: 512 / winnow end_to_end (the local runtime)"),
        "generate_512_s_7b": Piece(row7["generate_median_s"], "s", "gen_matrix_winnow_v2 7b fixed (512 rows, the "
                                   "engine alone: no 7B loop ran)"),
    }


@dataclass(frozen=True)
class Case:
    shape: str
    placement: str
    """where the engines are: "colocated" with the learner ranks, or "split" onto GPUs of their own"""
    strategy: str
    """the learner's: "fsdp2" or "deepspeed" (ZeRO-3)"""
    num_gpus: int
    driver_in_replicas: bool = False
    """the design change proposed for 64 GPUs: each replica scores its own samples and computes their advantages
    (a replica holds whole prompt groups), so the driver's per-sample work is one replica's, not all of it"""
    first_runs: bool = False
    """the code as the first 2-GPU runs (`ray_scaling.json`, the calibration) measured it: FSDP2's sync in fp32,
    one `full_tensor()` per parameter, and the driver's per-sample score and advantages of then (since then: the
    engine's bf16 in ~256 MiB buckets, one all-gather each; advantages ~5x cheaper)"""

    @property
    def unit(self) -> "Case":
        """The smallest run of this design (colocated: 1 GPU; split: 1 engine + 1 learner GPU): `linear` is
        num_gpus / its GPUs x its samples/s, projected by the same formulas with nothing to communicate."""
        return Case(self.shape, self.placement, self.strategy, 1 if self.placement == "colocated" else 2,
                    self.driver_in_replicas, self.first_runs)


@dataclass
class Phase:
    """One projected phase: its seconds, and the formula that gives them, named by the pieces it uses."""

    s: float
    formula: str


@dataclass(frozen=True)
class Layout:
    """Who does how much of one iteration's work (split: as many replicas as learner ranks)."""

    num_samples: int
    replicas: int
    ranks: int
    rows: int
    """rows each replica decodes at once"""
    driver_samples: int
    """samples the driver gathers, scores and turns into advantages, one after another"""


def layout(case: Case) -> Layout:
    num_samples = SAMPLES_PER_GPU * case.num_gpus
    replicas = case.num_gpus if case.placement == "colocated" else case.num_gpus // 2
    ranks = case.num_gpus if case.placement == "colocated" else case.num_gpus - replicas
    rows = num_samples // replicas
    return Layout(num_samples, replicas, ranks, rows, rows if case.driver_in_replicas else num_samples)


def project(case: Case, shape: Shape, pieces: dict[str, Piece], links: Links, workload: dict) -> dict[str, Phase]:
    """Seconds per phase of one iteration of `case`."""
    v = {k: p.value for k, p in pieces.items()}
    if case.first_runs:  # the driver's costs of the code those runs measured
        v.update({f"{k}_s_per_sample": v[f"{k}_s_per_sample_first_runs"] for k in ("score", "advantages")})
    lay = layout(case)
    tokens_per_sample = workload["prompt_len"] + workload["new_tokens"]
    return {
        "generate": generate_phase(case.shape, lay, v),
        "score": Phase(v["score_s_per_sample"] * lay.driver_samples,
                       f"score_s_per_sample x {lay.driver_samples} samples"),
        "advantages": Phase(v["advantages_s_per_sample"] * lay.driver_samples,
                            f"advantages_s_per_sample x {lay.driver_samples} samples"),
        "train": train_phase(case, shape, lay, lay.num_samples * tokens_per_sample, v, links, workload),
        "sync": sync_phase(case, shape, lay, v, links),
    }


def generate_phase(shape: str, lay: Layout, v: dict) -> Phase:
    """Every replica decodes its rows at once (constant in N at fixed rows per replica); the driver then
    receives the completions, one after another (linear in the samples it gathers)."""
    gather = v["gather_s_per_sample"] * lay.driver_samples
    if lay.rows == 256 and f"generate_256_s_{shape}" in v:  # measured in the loop
        return Phase(v[f"generate_256_s_{shape}"] + gather,
                     f"generate_256_s_{shape} + gather_s_per_sample x {lay.driver_samples} samples")
    scale = {512: 1.0, 256: v["rows_256_over_512"]}[lay.rows]
    replica = v[f"generate_512_s_{shape}"] * scale
    ratio = "" if lay.rows == 512 else " x rows_256_over_512"
    return Phase(replica + gather,
                 f"generate_512_s_{shape}{ratio} + gather_s_per_sample x {lay.driver_samples} samples")


def train_phase(case: Case, shape: Shape, lay: Layout, batch_tokens: int, v: dict, links: Links,
                workload: dict) -> Phase:
    """Compute on each rank's rows + the sharding traffic compute cannot hide + the batch's trip to every node."""
    samples_per_rank = lay.num_samples // lay.ranks
    tokens_per_rank = samples_per_rank * (workload["prompt_len"] + workload["new_tokens"])
    tflops_name = f"learner_tflops_{shape.name}" if f"learner_tflops_{shape.name}" in v else "learner_tflops_1.5b"
    tflops = v[tflops_name]
    compute = 6 * shape.num_params * tokens_per_rank / (tflops * 1e12)
    micro_batches = math.ceil(samples_per_rank / workload["micro_batch_size"])
    hidden, exposed = sharding_traffic_s(shape, lay.ranks, micro_batches, case.strategy, links)
    nodes = math.ceil(case.num_gpus / links.gpus_per_node)
    # the whole batch reaches every node once (ranks on one node share it in Ray's object store); with the
    # driver's work in the replicas each rank builds its rows where they were sampled, and nothing travels
    copies = 0 if case.driver_in_replicas else nodes - 1
    fanout = BATCH_BYTES_PER_TOKEN * batch_tokens * copies / (links.ray_object_gbps * 1e9)
    extra = v["ds_extra_train_s"] if case.strategy == "deepspeed" else 0.0
    seconds = compute + max(0.0, hidden - compute) + exposed + fanout + extra
    formula = (f"6 x {shape.num_params / 1e9:.2f}B x {tokens_per_rank} tokens / {tflops_name} "
               f"+ max(0, layer traffic {hidden:.2f} s - compute) + root unit {exposed:.3f} s "
               f"+ batch to {copies} other nodes {fanout:.2f} s" + (" + ds_extra_train_s" if extra else ""))
    return Phase(seconds, formula)


def sharding_traffic_s(shape: Shape, ranks: int, micro_batches: int, strategy: str, links: Links) -> tuple:
    """Per step and rank: every micro-batch all-gathers each layer's bf16 parameters twice (forward, and again in
    backward: layers are resharded after forward) and the root's once, and the last one reduce-scatters the
    gradients (fp32 under FSDP2's reduce_dtype, bf16 under DeepSpeed, assumed to move as much otherwise).
    Returns (seconds of the decoder layers' traffic, which FSDP2 prefetches under compute; seconds of the root
    unit's, which it cannot)."""
    if ranks == 1:
        return 0.0, 0.0
    grad_bytes = 4 if strategy == "fsdp2" else 2
    bandwidth = links.collective_gbps(ranks) * 1e9 * ranks / (ranks - 1)
    layers = (shape.num_params - shape.root_params) * (micro_batches * 2 * 2 + grad_bytes) / bandwidth
    # FSDP2 keeps the root unit unsharded from its forward to its backward: one gather per micro-batch
    root = shape.root_params * (micro_batches * 2 + grad_bytes) / bandwidth
    return layers, root


def sync_phase(case: Case, shape: Shape, lay: Layout, v: dict, links: Links) -> Phase:
    key = "fsdp2" if case.strategy == "fsdp2" else "ds"
    ranks, replicas = lay.ranks, lay.replicas
    if key == "fsdp2" and not case.first_runs:
        num_bytes = shape.num_params * v["fsdp2_bucketed_sync_bytes_per_param"]
        gather = bucketed_gather_s(ranks, num_bytes, v["fsdp2_gather_s_per_bucket"], links)
    else:
        num_bytes = shape.num_params * v[f"{key}_sync_bytes_per_param"]
        gather = full_weights_gather_s(shape, ranks, num_bytes, v[f"{key}_gather_s_per_tensor"], links)
    if case.placement == "colocated":
        copy = v["copy_s_per_byte"] * num_bytes
        return Phase(gather + copy + v["wake_s"], f"gather over {ranks} ranks {gather:.3f} s "
                     f"+ copy_s_per_byte x {num_bytes / 1e9:.2f} GB + wake_s")
    link = min(v["broadcast_gbps"], links.collective_gbps(case.num_gpus)) * 1e9
    buckets = math.ceil(num_bytes / SYNC_BUCKET_BYTES)
    latency = buckets * 3 * math.ceil(math.log2(replicas + 1)) * links.hop_s(case.num_gpus)
    send = num_bytes / link + latency
    return Phase(gather + send, f"gather over {ranks} ranks {gather:.3f} s + {num_bytes / 1e9:.2f} GB / "
                 f"min(broadcast_gbps, link) + {buckets} buckets x 3 x log2({replicas}+1) hops")


def full_weights_gather_s(shape: Shape, ranks: int, num_bytes: float, per_tensor_s: float, links: Links) -> float:
    """Every rank all-gathers each parameter in turn: a fixed cost per call (measured at 2 ranks), one more ring
    step per extra rank, and the bytes each rank receives over the slowest link."""
    if ranks == 1:
        return 0.0
    latency = shape.num_tensors * (per_tensor_s + (ranks - 2) * links.hop_s(ranks))
    return latency + num_bytes * (ranks - 1) / ranks / (links.collective_gbps(ranks) * 1e9)


def bucketed_gather_s(ranks: int, num_bytes: float, per_bucket_s: float, links: Links) -> float:
    """FSDP2's gather in buckets: one all-gather per ~256 MiB (a fixed cost each, measured at 2 ranks, plus a ring
    step per extra rank) and the bytes each rank receives over the slowest link."""
    if ranks == 1:
        return 0.0
    buckets = math.ceil(num_bytes / GATHER_BUCKET_BYTES)
    return (buckets * (per_bucket_s + (ranks - 2) * links.hop_s(ranks))
            + num_bytes * (ranks - 1) / ranks / (links.collective_gbps(ranks) * 1e9))


PHASES = ("generate", "score", "advantages", "train", "sync")


def projected_row(case: Case, all_shapes: dict[str, Shape], pieces: dict[str, Piece], links: Links,
                  workload: dict) -> dict:
    """One case at one GPU count: seconds per phase with their formulas, samples/s, efficiency against linear
    (the design's smallest unit times the GPUs), and the phase that loses most against that unit."""
    shape = all_shapes[case.shape]
    phases = project(case, shape, pieces, links, workload)
    unit_phases = project(case.unit, shape, pieces, links, workload)
    iteration = sum(p.s for p in phases.values())
    unit_iteration = sum(p.s for p in unit_phases.values())
    num_samples = layout(case).num_samples
    extra = {name: phases[name].s - unit_phases[name].s for name in PHASES}
    # a replica's decode is the same in both, so all of generate's growth is the driver's gather
    shortfall = {"driver": extra["generate"] + extra["score"] + extra["advantages"], "train": extra["train"],
                 "sync": extra["sync"]}
    return {**asdict(case), "num_samples": num_samples, "num_nodes": math.ceil(case.num_gpus / links.gpus_per_node),
            "phases_s": {name: p.s for name, p in phases.items()},
            "formulas": {name: p.formula for name, p in phases.items()},
            "iteration_s": iteration, "samples_per_s": num_samples / iteration,
            "linear_samples_per_s": SAMPLES_PER_GPU * case.num_gpus / unit_iteration,
            "efficiency": unit_iteration / iteration,
            "shortfall_s": shortfall,
            "largest_shortfall": max(shortfall, key=shortfall.get) if max(shortfall.values()) > 1e-9 else "none",
            "vs_one_gpu_run": vs_one_gpu_run(case, num_samples / iteration, pieces),
            "driver_s": driver_s(layout(case), pieces)}


def vs_one_gpu_run(case: Case, samples_per_s: float, pieces: dict[str, Piece]) -> float | None:
    """Samples/s against the GPUs times the measured 1-GPU local run (512 rows on one engine), where one ran."""
    one_gpu = pieces.get(f"one_gpu_samples_per_s_{case.shape}")
    return samples_per_s / (case.num_gpus * one_gpu.value) if one_gpu else None


def driver_s(lay: Layout, pieces: dict[str, Piece]) -> float:
    """Seconds of the iteration the driver spends on samples one by one: gathering, scoring, advantages."""
    per_sample = sum(pieces[f"{k}_s_per_sample"].value for k in ("gather", "score", "advantages"))
    return per_sample * lay.driver_samples


CALIBRATION = {
    "b": (Case("1.5b", "colocated", "fsdp2", 2, first_runs=True), ("generate", "sync")),
    "b_ds": (Case("1.5b", "colocated", "deepspeed", 2, first_runs=True), ("train", "sync")),
    "c": (Case("1.5b", "split", "fsdp2", 2, first_runs=True), ("generate", "sync")),
}
"""the 2-GPU cases the projection must give back, and the phases a piece was fitted on that same case (the
others are predicted from other cases: the 1-GPU run a, or b)"""


def calibration(results: Path, all_shapes, pieces, links, workload) -> dict:
    measured = {c["case"]: c for c in json.loads((results / "ray_scaling.json").read_text())["cases"]}
    out = {}
    for name, (case, fitted) in CALIBRATION.items():
        row = projected_row(case, all_shapes, pieces, links, workload)
        m = measured[name]
        out[name] = {"case": asdict(case), "fitted_on_this_case": list(fitted),
                     "projected_s": row["phases_s"], "measured_s": {p: m["phases_median_s"][p] for p in PHASES},
                     "projected_samples_per_s": row["samples_per_s"], "measured_samples_per_s": m["samples_per_s"]}
    return out


def check_7b(results: Path, all_shapes, pieces, links, workload) -> dict:
    """The formulas at the one 7B run (2 GPUs, colocated FSDP2): its generate and train are fitted (the 7B pieces
    come from it); score, advantages and sync are predicted. Its sync gathered bf16 one tensor at a time (the run
    came between the dtype change and the buckets): the per-tensor formula at 2 bytes a parameter."""
    run = _case(results / "ray_scaling_7b.json", "b")
    shape = all_shapes["7b"]
    row = projected_row(Case("7b", "colocated", "fsdp2", 2), all_shapes, pieces, links, workload)
    v = {k: p.value for k, p in pieces.items()}
    num_bytes = 2 * shape.num_params
    sync = full_weights_gather_s(shape, 2, num_bytes, v["fsdp2_gather_s_per_tensor"], links)
    sync += v["copy_s_per_byte"] * num_bytes
    projected = {**row["phases_s"], "sync": sync}  # the sync itself: the run's sync phase also ran its check
    iteration = sum(projected.values()) + v["wake_s"]
    return {"fitted_on_this_case": ["generate", "train"], "projected_s": projected,
            "measured_s": {**{p: run["phases_median_s"][p] for p in PHASES}, "sync": run["sync_s"]},
            "projected_samples_per_s": row["num_samples"] / iteration, "measured_samples_per_s": run["samples_per_s"]}


def learner_state_gib(shape: Shape, ranks: int) -> float:
    """fp32 weights, gradients and AdamW's two moments, sharded over the ranks (activations, the engine and the
    KV cache come on top and are not projected)."""
    return 16 * shape.num_params / ranks / 2**30


def projection(results: Path, links: Links) -> dict:
    all_shapes = shapes()
    pieces = measured_pieces(results, all_shapes, links)
    workload = json.loads((results / "ray_scaling.json").read_text())["workload"]
    rows = []
    for shape in ("0.5b", "1.5b", "7b"):
        for placement, strategy in CASES:
            for num_gpus in GPU_COUNTS:
                for driver_in_replicas in (False, True):
                    case = Case(shape, placement, strategy, num_gpus, driver_in_replicas)
                    row = projected_row(case, all_shapes, pieces, links, workload)
                    row["learner_state_gib_per_gpu"] = learner_state_gib(all_shapes[shape], layout(case).ranks)
                    rows.append(row)
    result = {"what": "paper projection of the Ray runtime's GRPO design from the 1- and 2-GPU measurements; "
                      "nothing here ran on more than 2 GPUs",
              "workload": {**workload, "samples_per_gpu": SAMPLES_PER_GPU, "gpu_counts": list(GPU_COUNTS)},
              "links": asdict(links), "pieces": {k: asdict(p) for k, p in pieces.items()},
              "shapes": {k: asdict(s) for k, s in all_shapes.items()},
              "calibration": calibration(results, all_shapes, pieces, links, workload),
              "check_7b": check_7b(results, all_shapes, pieces, links, workload),
              "driver_ceiling_samples_per_s": 1 / driver_s(Layout(1, 1, 1, 1, 1), pieces),
              "rows": rows, "unmeasured": UNMEASURED}
    result["design"] = design_notes(result, all_shapes, pieces, links)
    return result


UNMEASURED = [
    {"piece": "7B learner step at micro-batch 32", "assumed": "the 7B run's rate at micro-batches of 4 rows "
     "(learner_tflops_7b, 2 ranks): 32 rows do not fit beside the engine without activation checkpointing",
     "measure": "ray_scaling.py --shape 7b with --learner.micro-batch-memory or activation checkpointing"},
    {"piece": "a replica's 256 rows at 0.5B", "assumed": "the 1.5B ratio rows_256_over_512 (0.69)",
     "measure": "generate_shapes.py at 0.5B with 32 prompts x 8 (its workload is fixed at 64 x 8 today) "
     "on one H200"},
    {"piece": "anything across nodes", "assumed": "Links: InfiniBand 50 GB/s per GPU at 0.8 efficiency, "
     "10 us per ring step; Ray moving the batch between nodes at 2 GB/s",
     "measure": "two 8-GPU nodes: nccl-tests all_gather and broadcast, a 1 GB ray.get across the nodes, and "
     "ray_scaling.py at 16 GPUs"},
    {"piece": "4 and 8 GPUs in one node", "assumed": "NVLink 450 GB/s per direction at 0.8 efficiency; the "
     "per-tensor gather cost measured at 2 ranks plus 3 us per extra ring step",
     "measure": "ray_scaling.py on one host with 4 or 8 H200s (none was available)"},
    {"piece": "ZeRO-3's extra seconds per step at more ranks", "assumed": "constant: ds_extra_train_s as measured at "
     "2 ranks (its unfused AdamW over 1/N of the parameters would shrink it; more ranks' gathers could grow it)",
     "measure": "ray_scaling.py's b_ds on one host with 4 or 8 H200s, with DeepSpeed's wall_clock_breakdown"},
    {"piece": "the driver's per-sample costs at 16,384 samples", "assumed": "linear in the samples: score and "
     "advantages as measured at 2,048 (0.20 and 0.05 ms a sample at 1,024), gather at 512", "measure": "the driver alone on 16,384 synthetic completions (CPU)"},
]
"""pieces the projection needs that no run measured, what stands in for each, and the run that would measure it"""


NAMES = {("colocated", "fsdp2"): "colocated, FSDP2", ("colocated", "deepspeed"): "colocated, ZeRO-3",
         ("split", "fsdp2"): "split (N/2 + N/2), FSDP2"}


def markdown(result: dict) -> str:
    headline = [r for r in result["rows"] if r["shape"] in ("0.5b", "7b") and r["num_gpus"] > 2
                and not r["driver_in_replicas"]]
    return "\n".join([
        "# The Ray runtime's GRPO design projected to 8 and 64 H200s (paper projection)", "",
        "Nothing here ran on more than 4 GPUs (weak scaling on four H200s: `ray_scaling_weak.md`), and no 8-GPU "
        "machine was available. Every number is arithmetic (`benchmarks/ray_projection.py`) on pieces measured on "
        "one and two H200s (`ray_scaling.json`, `ray_scaling_w2_bucketed.json`, `ray_scaling_7b.json`, "
        "`grpo_benchmark.json`, `gen_matrix_winnow_v2.json`) and on the link figures below. The sync is the one built "
        "now: FSDP2 gathers the engine's bf16 in ~256 MiB buckets. Workload: weak scaling "
        f"at {SAMPLES_PER_GPU} samples per GPU (the 2-GPU run's), 128-token prompts, 512 new tokens, micro-batch 32, "
        "one optimizer step per iteration; 8 GPUs = one node (256 prompts x 8), 64 GPUs = 8 nodes (2048 x 8).", "",
        "*linear*: the design's smallest unit (colocated: 1 GPU; split: 1 engine + 1 learner GPU) times the GPUs, "
        "projected by the same formulas with nothing to communicate and a driver handling only that unit's "
        "samples; *efficiency* = linear's iteration time / the projected one (at 7B the unit is a reference only: "
        "its 113.5 GiB of learner state does not fit one GPU beside its engine and activations). *vs 1-GPU "
        "run*: against the GPUs times the measured local run on one GPU (512 rows per engine; at 1.5B the "
        "2-GPU run reached 0.84 of it, mostly because a replica's 256 rows take 69% of 512 rows' time). "
        "*shortfall*: seconds lost against linear, by where they are lost: the driver (gathering, scoring, "
        "advantages), the learner's step, the sync.", "",
        *row_table(headline), "", *design_section(result), "", *calibration_table(result["calibration"]), "",
        *check_7b_table(result["check_7b"]), "",
        *formulas_section(result), "", *pieces_table(result["pieces"]), "", *links_table(result["links"]), "",
        *unmeasured_table(result["unmeasured"]), "", "<details><summary>Every projected row (three shapes, 2, 8 "
        "and 64 GPUs, the driver as built and in the replicas)</summary>", "", *row_table(result["rows"]), "",
        "</details>", ""])


def row_table(rows: list[dict]) -> list[str]:
    lines = ["| shape | design | GPUs | driver | samples/s | linear | efficiency | vs 1-GPU run | generate s | "
             "score + adv. s | train s | sync s | iteration s | largest shortfall | learner state GiB/GPU |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        p, worst = r["phases_s"], r["largest_shortfall"]
        vs_one = f"{r['vs_one_gpu_run']:.2f}" if r["vs_one_gpu_run"] is not None else "-"
        lost = f"{worst} (+{r['shortfall_s'][worst]:.2f} s)" if worst != "none" else "none"
        lines.append(
            f"| {r['shape']} | {NAMES[(r['placement'], r['strategy'])]} | {r['num_gpus']} | "
            f"{'in replicas' if r['driver_in_replicas'] else 'as built'} | {r['samples_per_s']:.1f} | "
            f"{r['linear_samples_per_s']:.1f} | {r['efficiency']:.2f} | {vs_one} | {p['generate']:.2f} | "
            f"{p['score'] + p['advantages']:.2f} | {p['train']:.2f} | {p['sync']:.2f} | {r['iteration_s']:.2f} | "
            f"{lost} | {r['learner_state_gib_per_gpu']:.1f} |")
    return lines


def calibration_table(cal: dict) -> list[str]:
    lines = ["## Calibration: the formulas at 2 GPUs against the 2-GPU measurement (1.5B shape)", "",
             "A phase marked *fitted* uses a piece read from that same case; the others are predicted from other "
             "cases (the 1-GPU run a, or b). `tests/test_benchmarks.py` holds every phase to 10% (or 0.01 s) and "
             "samples/s to 3%.", "",
             "| case | phase | projected s | measured s | off | |", "|---|---|---:|---:|---:|---|"]
    for name, c in cal.items():
        lines += [f"| {name} {row}" for row in _comparison_rows(c)]
    return lines


def _comparison_rows(c: dict) -> list[str]:
    """Table rows (after the first column) of one projected-against-measured case: each phase, then samples/s."""
    rows = []
    for phase in PHASES:
        proj, meas = c["projected_s"][phase], c["measured_s"][phase]
        how = "fitted" if phase in c["fitted_on_this_case"] else "predicted"
        rows.append(f"| {phase} | {proj:.3f} | {meas:.3f} | {(proj - meas) / meas:+.1%} | {how} |")
    proj, meas = c["projected_samples_per_s"], c["measured_samples_per_s"]
    return rows + [f"| **samples/s** | {proj:.2f} | {meas:.2f} | {(proj - meas) / meas:+.1%} | |"]


def check_7b_table(check: dict) -> list[str]:
    lines = ["## The one 7B run: the formulas at 2 GPUs against it", "",
             "`ray_scaling_7b.json`: colocated FSDP2 on two H200s, 64 prompts x 8 samples, micro-batches of 4 rows. "
             "Its generate and train are the 7B pieces (fitted); the rest is predicted. Sync is the sync itself "
             "(`sync/seconds`: its phase also ran `--sync.check-sync`), gathered in bf16 one tensor at a time, as "
             "the code then did.", "", "| phase | projected s | measured s | off | |", "|---|---:|---:|---:|---|"]
    return lines + _comparison_rows(check)


def formulas_section(result: dict) -> list[str]:
    pick = [r for r in result["rows"] if r["num_gpus"] == 64 and r["placement"] == "colocated"
            and r["strategy"] == "fsdp2" and not r["driver_in_replicas"] and r["shape"] in ("0.5b", "7b")]
    lines = ["## What each phase grows as", "",
             "- **generate**: every replica decodes its rows at once, so at fixed rows per replica it is constant "
             "in N (`generate_512_s_<shape>`, x `rows_256_over_512` for 256 rows); the driver then receives and "
             "unpickles every completion one after another: `gather_s_per_sample` x samples, linear in N.",
             "- **score, advantages**: in the driver process, per sample: `score_s_per_sample` and "
             "`advantages_s_per_sample` x samples, linear in N.",
             "- **train**: compute on the rank's rows, 6 x params x tokens / `learner_tflops_<shape>`, constant in N; "
             "plus the sharding traffic per step and rank, (micro-batches x 2 bf16 all-gathers of each layer, x 1 of "
             "the root unit, + one reduce-scatter, fp32 under FSDP2, bf16 under ZeRO-3) x params x (n-1)/n over "
             "NVLink inside a node, the NIC across nodes: the decoder layers' share is prefetched under compute "
             "(only the excess counts), the root unit's (embedding, head) is not; plus the whole batch (24 B per "
             "token) sent by Ray's object store to every other node; plus `ds_extra_train_s` for ZeRO-3.",
             "- **sync**, colocated: every FSDP2 rank gathers the bf16 weights in ~256 MiB buckets "
             "(`fsdp2_gather_s_per_bucket` x buckets, + a ring step per extra rank, + bytes x (n-1)/n over the "
             "slowest link; ZeRO-3 gathers every parameter in turn, `ds_gather_s_per_tensor` x tensors), then copies "
             "them into its engine (`copy_s_per_byte` x bytes) and wakes it (`wake_s`). Split: the same gather over the "
             "learner ranks, then the broadcast: bytes / min(`broadcast_gbps`, link), independent of the number of "
             "replicas for 256 MiB buckets, + 3 broadcasts per bucket x log2(replicas + 1) ring steps.", "",
             "The 64-GPU rows' formulas, filled in:", ""]
    for r in pick:
        lines += [f"- {r['shape']}, colocated FSDP2, 64 GPUs:"]
        lines += [f"  - {phase}: {r['phases_s'][phase]:.2f} s = {r['formulas'][phase]}" for phase in PHASES]
    return lines


def pieces_table(pieces: dict) -> list[str]:
    lines = ["## Measured pieces", "", "| piece | value | source |", "|---|---:|---|"]
    lines += [f"| `{k}` | {p['value']:.4g} {p['unit']} | {p['source']} |" for k, p in pieces.items()]
    return lines


def links_table(links: dict) -> list[str]:
    lines = ["## Assumed links (not measured here)", "", "| parameter | value | source |", "|---|---:|---|"]
    lines += [f"| `{name}` | {value:g} | {LINK_SOURCES[name]} |" for name, value in links.items()]
    return lines


LINK_SOURCES = {
    "nvlink_gbps": "H200 SXM NVLink: 900 GB/s bidirectional per GPU (NVIDIA H200 datasheet), one direction",
    "ib_gbps": "400 Gb/s InfiniBand NDR per GPU, one NIC per GPU (typical HGX H200 cluster)",
    "collective_efficiency": "share of the link NCCL's large-message rings reach (assumed; nccl-tests bus bandwidth)",
    "nvlink_hop_s": "one ring step inside a node (assumed; nccl-tests small-message latency)",
    "ib_hop_s": "one ring step across nodes (assumed; nccl-tests small-message latency)",
    "ray_object_gbps": "Ray object store between nodes (assumed; unmeasured)",
    "gpus_per_node": "HGX H200",
}


def sync_options(shape: Shape, pieces: dict[str, Piece], links: Links, num_gpus: int) -> dict[str, float]:
    """Colocated FSDP2 sync seconds at `num_gpus`: as first built (fp32, one gather per parameter), as built now
    (the engine's bf16, one gather per ~256 MiB bucket), and with the gather kept inside a node (ranks sharded
    within a node and replicated across nodes, HSDP, so the full weights are gathered over NVLink)."""
    v = {k: p.value for k, p in pieces.items()}

    def sync(gather_ranks: int, bucketed: bool) -> float:
        if bucketed:
            num_bytes = shape.num_params * v["fsdp2_bucketed_sync_bytes_per_param"]
            gather = bucketed_gather_s(gather_ranks, num_bytes, v["fsdp2_gather_s_per_bucket"], links)
        else:
            num_bytes = shape.num_params * v["fsdp2_sync_bytes_per_param"]
            gather = full_weights_gather_s(shape, gather_ranks, num_bytes, v["fsdp2_gather_s_per_tensor"], links)
        return gather + v["copy_s_per_byte"] * num_bytes + v["wake_s"]

    node = min(num_gpus, links.gpus_per_node)
    return {"per_tensor_fp32": sync(num_gpus, False), "bucketed_bf16": sync(num_gpus, True),
            "bucketed_bf16_node_local": sync(node, True)}


def design_notes(result: dict, all_shapes: dict[str, Shape], pieces: dict[str, Piece], links: Links) -> dict:
    """The numbers behind the design changes proposed for 64 GPUs."""
    def row(shape: str, driver_in_replicas: bool) -> dict:
        return next(r for r in result["rows"] if r["shape"] == shape and r["num_gpus"] == 64 and
                    r["placement"] == "colocated" and r["strategy"] == "fsdp2"
                    and r["driver_in_replicas"] == driver_in_replicas)

    notes = {}
    for shape in all_shapes:
        built, changed = row(shape, False), row(shape, True)
        notes[shape] = {"efficiency_as_built": built["efficiency"],
                        "efficiency_driver_in_replicas": changed["efficiency"],
                        "driver_share_as_built": built["driver_s"] / built["iteration_s"],
                        "linear_samples_per_s": built["linear_samples_per_s"],
                        "sync_s_64": sync_options(all_shapes[shape], pieces, links, 64)}
    return notes


def design_section(result: dict) -> list[str]:
    ceiling, notes = result["driver_ceiling_samples_per_s"], result["design"]
    lines = ["## Where the design should change at 64 GPUs", "",
             f"1. **The driver.** As built it gathers, scores and turns into advantages every sample one after "
             f"another: {1e3 / ceiling:.2f} ms per sample (gather, measured on 2 GPUs, + score + advantages, on 4), so it "
             f"alone caps a run at **{ceiling:,.0f} samples/s** whatever the GPU count, and it grows linearly "
             "with N while the GPUs' work per iteration stays constant. At 64 GPUs (colocated FSDP2):", ""]
    lines += [f"   - {shape}: the driver is {n['driver_share_as_built']:.0%} of the iteration; linear would be "
              f"{n['linear_samples_per_s']:,.0f} samples/s; efficiency {n['efficiency_as_built']:.2f}"
              for shape, n in notes.items()]
    lines += ["", "   The change: score and compute advantages in the replicas. A replica holds whole prompt groups "
              "(prompts are sharded contiguously, all samples of a prompt together), so GRPO's group baseline is "
              "local. With colocated placement each rank would then train the rows its own replica sampled "
              "(today `Learner.shard` takes every world_size-th row of the whole batch; the step is the same "
              "either way, since the loss normalisers are all-reduced over the ranks), so the batch never leaves "
              "the worker and the driver receives only metrics. The reward pool (`--ray.num-oracle-workers`) "
              "already spreads the reward functions, but the texts still pass through the driver. Projected "
              "64-GPU efficiency with the change: " +
              ", ".join(f"{s} {n['efficiency_as_built']:.2f} -> {n['efficiency_driver_in_replicas']:.2f}"
                        for s, n in notes.items()) + ".",
              "2. **The weight sync** (colocated FSDP2, 64 GPUs). As first built every rank gathered the fp32 "
              "weights one tensor at a time; now it gathers the engine's bf16 in ~256 MiB buckets, one all-gather "
              "each (measured on 2 GPUs at 1.5B: 0.246 -> 0.058 s). Across 64 ranks the bytes then cross "
              "InfiniBand; sharding within a node and replicating across nodes (HSDP) would keep the gather on "
              "NVLink:", "",
              "   | shape | per tensor, fp32 (first built) s | buckets, bf16 (built) s | buckets, bf16, gather in "
              "node s |", "   |---|---:|---:|---:|"]
    for shape, n in notes.items():
        o = n["sync_s_64"]
        lines.append(f"   | {shape} | {o['per_tensor_fp32']:.2f} | {o['bucketed_bf16']:.2f} | "
                     f"{o['bucketed_bf16_node_local']:.2f} |")
    lines += ["", "3. **The learner.** At fixed work per GPU FSDP2's layer traffic stays under compute even over "
              "InfiniBand (per micro-batch the traffic and the compute both scale with the parameters); what shows "
              "is the root unit (embedding and head, 14% of the 7B model) gathered before the first layer of each "
              "micro-batch, and the batch sent to every node. HSDP moves the gathers onto NVLink, leaving one "
              "all-reduce of each GPU's gradient shard across the nodes per step; the driver change removes the "
              "batch's trip.",
              "4. **Split placement** stays at half the GPUs idle per phase while the loop is synchronous; it pays "
              "only with asynchronous generation, which winnow does not have."]
    return lines


def unmeasured_table(unmeasured: list[dict]) -> list[str]:
    lines = ["## Not measured: what stands in, and the run that would measure it", "",
             "| piece | assumed | measurement that would provide it |", "|---|---|---|"]
    lines += [f"| {u['piece']} | {u['assumed']} | {u['measure']} |" for u in unmeasured]
    return lines


def plot(result: dict, path: Path) -> None:
    """Efficiency against GPUs, colocated FSDP2, per shape: the driver as built and in the replicas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for color, shape in zip(("C0", "C1", "C2"), ("0.5b", "1.5b", "7b")):
        for in_replicas, style in ((False, "o-"), (True, "s--")):
            pts = [r for r in result["rows"] if r["shape"] == shape and r["placement"] == "colocated"
                   and r["strategy"] == "fsdp2" and r["driver_in_replicas"] == in_replicas]
            label = f"{shape}, driver {'in replicas' if in_replicas else 'as built'}"
            ax.plot([r["num_gpus"] for r in pts], [r["efficiency"] for r in pts], style, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(GPU_COUNTS, [str(n) for n in GPU_COUNTS])
    ax.minorticks_off()
    ax.set(ylim=(0, 1.05), xlabel="GPUs (8 per node)", ylabel="efficiency vs linear",
           title="Ray runtime GRPO, colocated FSDP2: projected, not run beyond 2 GPUs")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder of the measured JSONs")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for ray_projection.{json,md,png}")
    parser.add_argument("--no-plot", action="store_true", help="skip ray_projection.png")
    args = parser.parse_args()
    links = Links()
    result = projection(args.results, links)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_projection.json").write_text(json.dumps(result, indent=2))
    (args.out / "ray_projection.md").write_text(markdown(result))
    if not args.no_plot:
        plot(result, args.out / "ray_projection.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
