"""What the two GRPO-iteration benchmarks share: the workload, the model, the tokenizer, the reward, the
device ceilings and the physical floors. `grpo_iteration.py` (winnow) and `trl_grpo_iteration.py` (TRL)
import it, so both sides do exactly the same work.

The workload (issue 5): one GRPO policy iteration on a randomly initialised model of the Qwen2.5-0.5B shape
(`qwen25_05b_config.json`), 64 prompts x 8 samples, 128-token prompts, 512 new tokens at a fixed length
(EOS never ends a response), one optimizer step over all 512 samples, micro-batches of 32 sequences,
activation checkpointing off (both sides; the first measurement, 2026-11-24, used 16 and on). `--cpu`
shrinks it to a tiny Qwen2 that runs in seconds (a smoke test, not
a timed test).
"""
from __future__ import annotations

import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "qwen25_05b_config.json"
SEED = 0


@dataclass
class Workload:
    num_prompts: int
    num_samples: int
    prompt_len: int
    new_tokens: int
    micro_batch_size: int
    gradient_checkpointing: bool
    warmup_iterations: int
    measured_iterations: int
    engine_compile: bool = False
    """winnow only: HFEngineConfig.compile_decode (the decode step's per-layer glue compiled)"""
    learner_compile: bool = False
    """winnow only: learner.compile (torch.compile per decoder layer); TRL runs with its default, no compile"""
    lr: float = 1e-6
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    share_prompts: bool = False
    """winnow only: learner.share_prompts (each prompt's samples run it once in the learner)"""
    micro_batch_tokens: int = 0
    """winnow only: learner.micro_batch_tokens (0: micro-batches of micro_batch_size rows)"""
    forward_while_scoring: bool = True
    """winnow only: learner.forward_while_scoring (the first micro-batch's forward runs while the host scores)"""

    @property
    def num_sequences(self) -> int:
        return self.num_prompts * self.num_samples

    @property
    def generated_tokens(self) -> int:
        return self.num_sequences * self.new_tokens

    @property
    def trained_tokens(self) -> int:
        """Every position the learner runs forward and backward over: prompt + response."""
        return self.num_sequences * (self.prompt_len + self.new_tokens)


GPU_WORKLOAD = Workload(num_prompts=64, num_samples=8, prompt_len=128, new_tokens=512, micro_batch_size=32,
                        gradient_checkpointing=False, warmup_iterations=1, measured_iterations=3,
                        learner_compile=True, engine_compile=True)
CPU_WORKLOAD = Workload(num_prompts=4, num_samples=4, prompt_len=16, new_tokens=32, micro_batch_size=4,
                        gradient_checkpointing=True, warmup_iterations=1, measured_iterations=2)

TINY_CONFIG = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                   attention_dropout=0.0, bos_token_id=1000, eos_token_id=1000)


def model_config(cpu: bool):
    from transformers import Qwen2Config

    if cpu:
        return Qwen2Config(**TINY_CONFIG)
    raw = json.loads(CONFIG_PATH.read_text())
    for key in ("model_type", "architectures", "torch_dtype"):
        raw.pop(key, None)
    return Qwen2Config(**raw)


def build_model(cpu: bool, device: torch.device):
    """Random init from SEED, float32 master weights (the learner trains them under bf16 autocast on GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(model_config(cpu), dtype=torch.float32)
    model.generation_config.eos_token_id = model.config.eos_token_id
    return model.to(device)


def build_tokenizer(vocab_size: int, eos_id: int):
    """A word-level tokenizer with one word per model id ("t0" ... "t151935"), built in-process (~1 s):
    prompts are exactly `prompt_len` words, so exactly `prompt_len` tokens, and every id the random model
    samples decodes. EOS = pad = the model's EOS id (as Qwen2.5 base); no BOS is added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = f"t{eos_id}"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos, unk_token="t0")
    tokenizer.padding_side = "left"
    return tokenizer


def prompt_texts(workload: Workload, vocab_size: int, eos_id: int, num_iterations: int) -> list[str]:
    """`num_iterations` x `num_prompts` prompts of `prompt_len` random words (never EOS), seeded."""
    rng = random.Random(SEED)
    high = min(vocab_size, eos_id) - 1
    return [" ".join(f"t{rng.randint(10, high)}" for _ in range(workload.prompt_len))
            for _ in range(num_iterations * workload.num_prompts)]


def parity_reward_texts(completions: list[str]) -> list[float]:
    """The synthetic verifiable reward: the fraction of response tokens with an even id (checked from the
    decoded text, as a real verifier parses text). Dense, so no group has a uniform reward."""
    out = []
    for text in completions:
        words = text.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return out


def parity_reward(prompts, completions, reference=None, **columns):
    """`parity_reward_texts` with the reward-function signature a FunctionOracle calls."""
    return parity_reward_texts(completions)


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """(seconds, fn()) with the device's queued work finished on both sides of the clock."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def measure_ceilings(device: torch.device) -> dict:
    """The two ceilings, measured: a large bf16 matmul (TFLOP/s) and a large device-to-device copy (bytes
    read + written per second). Median of 10 timed runs after 3 warm-ups, random data."""
    if device.type != "cuda":
        n, dtype, copy_numel = 512, torch.float32, 1 << 24
    else:
        n, dtype, copy_numel = 8192, torch.bfloat16, 1 << 30  # 2 GiB of bf16
    g = torch.Generator(device).manual_seed(SEED)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    src = torch.randn(copy_numel, device=device, dtype=dtype, generator=g)
    dst = torch.empty_like(src)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return median(times)

    mm_s = timed(lambda: a @ b)
    copy_s = timed(lambda: dst.copy_(src))
    result = {
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
        "matmul_tflops": 2 * n**3 / mm_s / 1e12,
        "copy_bytes": 2 * src.numel() * src.element_size(),
        "bandwidth_gbps": 2 * src.numel() * src.element_size() / copy_s / 1e9,
    }
    del a, b, src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------- floors


def floors(cfg, num_params: int, workload: Workload, ceilings: dict) -> dict:
    """Physical lower bounds (seconds) of each phase at the measured ceilings.

    generate: per decode step, max(bytes / bandwidth, FLOPs / peak), summed over steps, plus the prefill;
      bytes = the bf16 weights read once + the K/V cache read up to the current length + the new K/V
      written; FLOPs = 2 N per token + attention (4 x layers x heads x head_dim x context per token).
    train: 6 N x trained tokens (prompt + response) / peak (the issue's definition; activation
      checkpointing's extra forward and attention FLOPs are not counted, so this floor is optimistic).
      train_shared: the same with each prompt's tokens counted once for its samples, the floor of a learner
      that shares prompts (`--learner.share-prompts`).
      generate_shared: the same as generate with each prompt's K/V read once a step for its samples (an engine
      whose samples of one prompt read one copy of it: winnow's static decoder, vLLM's prefix caching).
    sync: the fp32 master weights read + the bf16 engine copy written, over bandwidth (winnow; TRL
      generates with the training weights and has no sync).
    """
    peak = ceilings["matmul_tflops"] * 1e12
    bandwidth = ceilings["bandwidth_gbps"] * 1e9
    layers, heads, kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    batch, prompt = workload.num_sequences, workload.prompt_len
    kv_bytes_per_token = layers * 2 * kv_heads * head_dim * 2  # K and V, bf16
    weight_bytes = 2 * num_params
    # prefill: one pass over every prompt token
    prefill_flops = 2 * num_params * batch * prompt + 2 * layers * heads * head_dim * prompt * prompt * batch
    prefill_bytes = weight_bytes + batch * prompt * kv_bytes_per_token
    generate_s = max(prefill_flops / peak, prefill_bytes / bandwidth)
    generate_shared_s = generate_s
    groups = workload.num_prompts
    decode_bytes_total = decode_flops_total = 0.0
    for step in range(1, workload.new_tokens):  # the first new token comes from the prefill's logits
        context = prompt + step
        step_bytes = weight_bytes + batch * context * kv_bytes_per_token + batch * kv_bytes_per_token
        step_flops = 2 * num_params * batch + 4 * layers * heads * head_dim * context * batch
        generate_s += max(step_bytes / bandwidth, step_flops / peak)
        shared_bytes = step_bytes - (batch - groups) * prompt * kv_bytes_per_token
        generate_shared_s += max(shared_bytes / bandwidth, step_flops / peak)
        decode_bytes_total += step_bytes
        decode_flops_total += step_flops
    train_flops = 6 * num_params * workload.trained_tokens
    # The same with every prompt run once for its samples (what the learner's shared prompts run).
    shared_flops = 6 * num_params * (workload.trained_tokens - workload.num_prompts * (workload.num_samples - 1)
                                     * workload.prompt_len)
    return {
        "generate_s": generate_s,
        "generate_shared_s": generate_shared_s,
        "generate_bound": "memory" if decode_bytes_total / bandwidth > decode_flops_total / peak else "compute",
        "decode_bytes": decode_bytes_total,
        "decode_flops": decode_flops_total,
        "train_s": train_flops / peak,
        "train_flops": train_flops,
        "train_shared_s": shared_flops / peak,
        "sync_s": (4 + 2) * num_params / bandwidth,
        "score_s": 0.0,
        "logprobs_s": 0.0,
        "note": "score has no device floor (CPU string work); logprobs is not run in either framework "
                "(one optimizer step per iteration: pi_old = pi, both skip the extra forward)",
    }


def iteration_floor(floor: dict) -> float:
    """The iteration's floor: the sum of its phases' floors."""
    return sum(floor[f"{phase}_s"] for phase in ("generate", "score", "logprobs", "train", "sync"))


def over_floor(phases: dict, floor: dict) -> dict:
    """Each phase's median seconds over its floor (the phases with a device floor), and the iteration's over
    `iteration_floor`."""
    out = {phase: phases[phase] / floor[f"{phase}_s"] for phase in ("generate", "train", "sync")
           if phases.get(phase) and floor[f"{phase}_s"]}
    if phases.get("learner") and floor["train_s"]:  # the learner's seconds, where they span more than `train`
        out["train"] = phases["learner"] / floor["train_s"]
    if phases.get("end_to_end"):
        out["end_to_end"] = phases["end_to_end"] / iteration_floor(floor)
        # against the floor with each prompt trained once per group and its K/V read once a decode step for its
        # samples (the fair floor when prompts are shared)
        shared = (iteration_floor(floor) - floor["train_s"] + floor.get("train_shared_s", floor["train_s"])
                  - floor["generate_s"] + floor.get("generate_shared_s", floor["generate_s"]))
        out["end_to_end_vs_shared_floor"] = phases["end_to_end"] / shared
        if phases.get("generate") and floor.get("generate_shared_s"):
            out["generate_vs_shared_floor"] = phases["generate"] / floor["generate_shared_s"]
    return out


# ---------------------------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    for name in ("trl", "accelerate", "datasets"):
        try:
            env["versions"][name] = __import__(name).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


def workload_dict(workload: Workload) -> dict:
    return {**asdict(workload), "num_sequences": workload.num_sequences,
            "generated_tokens": workload.generated_tokens, "trained_tokens": workload.trained_tokens}


def summarize(phase_rows: list[dict[str, float]], workload: Workload, num_params: int, ceilings: dict) -> dict:
    """Median of every phase over the measured iterations, and the derived rates."""
    keys = sorted({k for row in phase_rows for k in row})
    med = {k: median([row.get(k, 0.0) for row in phase_rows]) for k in keys}
    out = {"phases_median_s": med, "phases_per_iteration_s": phase_rows}
    if med.get("generate"):
        out["generated_tokens_per_s"] = workload.generated_tokens / med["generate"]
    learner = med.get("learner") or med.get("train")  # the learner's seconds where a side times them apart
    if learner:
        out["trained_tokens_per_s"] = workload.trained_tokens / learner
        achieved = 6 * num_params * workload.trained_tokens / learner
        out["learner_model_tflops"] = achieved / 1e12
        out["learner_mfu"] = achieved / (ceilings["matmul_tflops"] * 1e12)
    return out
