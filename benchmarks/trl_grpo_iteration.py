"""The peer: the same GRPO iteration with TRL's GRPOTrainer, its own generation (no vLLM), timed per phase.

    python benchmarks/trl_grpo_iteration.py --out trl.json           # GPU: the Qwen2.5-0.5B-shape workload
    python benchmarks/trl_grpo_iteration.py --cpu --out trl.json     # CPU: tiny Qwen2, seconds (smoke test)
    python benchmarks/trl_grpo_iteration.py --vllm-colocate --out trl_vllm.json   # GPU: TRL sampling with vLLM

`--vllm-colocate` is the setup a TRL user with one GPU runs: use_vllm = True, vllm_mode = "colocate" (vLLM in
the trainer's process, TRL's own weight push before each generation, counted in its generate phase), bf16
vLLM loading the same random init (saved as a bf16 checkpoint, as published models are), generation_kwargs
{"min_tokens": 512} so EOS cannot end a response, vllm_max_model_length = prompt + response; TRL's defaults
otherwise (vllm_gpu_memory_utilization 0.3, no sleep mode, importance-sampling correction on, which adds the
old-logprobs pass).

Needs trl (1.16.0 was measured; it is no dependency of winnow) and datasets. Same model config, same random
init (seed 0, float32 master weights), same tokenizer, prompts and reward as `grpo_iteration.py`
(`grpo_common.py`). Batch semantics, as a TRL user would set them for one optimizer step over 512 samples:

    per_device_train_batch_size = 32 (the micro-batch, as winnow's), gradient_accumulation_steps = 16,
    steps_per_generation = 16 (so generation_batch_size = 512 = 64 prompts x num_generations 8, generated
    in one `model.generate` call), num_iterations = 1, beta = 0, loss_type = "grpo", scale_rewards = "group",
    max_completion_length = 512 with generation_kwargs {"min_new_tokens": 512} (EOS can never end a
    response), use_vllm = False, bf16 = True (autocast over the float32 weights), gradient_checkpointing = False
    (as winnow's: the H200 has the memory),
    lr 1e-6 constant, max_grad_norm 1.0; TRL's defaults otherwise (dynamic KV cache for generation, fused
    lm-head log-probs, adamw_torch_fused).

Phases are timed by wrapping the trainer's own methods on the instance, with torch.cuda.synchronize at
each boundary: generate = `_generate` (prompt tokenisation, `model.generate`, EOS masking, detokenising);
score = `_calculate_rewards`; logprobs = `_get_per_token_logps_and_entropies` when called without grad
inside `_generate_and_score_completions` (the old-logprobs pass; TRL skips it here, as winnow does);
advantages = the rest of `_generate_and_score_completions` (padding, advantages, metrics); end_to_end =
from one `on_step_end` callback to the next (the whole optimizer step, logging included); train =
end_to_end - `_generate_and_score_completions` (the 16 forward/backward micro-steps, the optimizer step
and the trainer's bookkeeping). sync = 0: without vLLM the policy generates with its training weights.
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch

import grpo_common as common
from winnow.data.tiny import save_tokenizer


def parity_reward(prompts, completions, **kwargs):
    return common.parity_reward_texts(completions)


class PhaseClock:
    """Accumulates synchronised wall time per phase within the current optimizer step."""

    def __init__(self, device):
        self.device, self.current, self.in_generate_and_score = device, {}, False

    def wrap(self, obj, name: str, phase: str, only_if=None):
        original = getattr(obj, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if only_if is not None and not only_if():
                return original(*args, **kwargs)
            common.sync(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                common.sync(self.device)
                self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny model on CPU (seconds; a smoke test)")
    parser.add_argument("--out", default="trl_grpo.json")
    parser.add_argument("--iterations", type=int, default=None, help="measured iterations (default: 3 GPU, 2 CPU)")
    parser.add_argument("--vllm-colocate", action="store_true",
                        help="TRL's use_vllm=True, vllm_mode='colocate' (needs vLLM on the GPU)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop after the step that would leave too little time for another (>= 1 measured)")
    return parser.parse_args()


def vllm_settings(args, model, tokenizer, workload, result: dict) -> dict:
    """GRPOConfig's generation settings: TRL's own `model.generate`, or vLLM colocated (which loads the policy
    from a checkpoint this writes)."""
    if not args.vllm_colocate:
        return {"use_vllm": False, "generation_kwargs": {"min_new_tokens": workload.new_tokens}}
    import copy

    checkpoint = Path(tempfile.mkdtemp()) / "policy"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(checkpoint)
    save_tokenizer(tokenizer, checkpoint)  # a tokenizer class every transformers version loads
    model.name_or_path = model.config._name_or_path = str(checkpoint)
    result["framework"] = "trl+vllm-colocate"
    return {"use_vllm": True, "vllm_mode": "colocate",
            "vllm_max_model_length": workload.prompt_len + workload.new_tokens,
            "generation_kwargs": {"min_tokens": workload.new_tokens}}


def grpo_config(workload, cpu: bool, generation: dict):
    """TRL's GRPOConfig for the benchmark's workload: one optimizer step over all samples per generation."""
    from trl import GRPOConfig

    accumulation = workload.num_sequences // workload.micro_batch_size
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=workload.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_generations=workload.num_samples,
        num_iterations=1,
        max_completion_length=workload.new_tokens,
        temperature=workload.temperature, top_p=1.0, top_k=0,
        **generation,
        beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=workload.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=workload.max_grad_norm,
        gradient_checkpointing=workload.gradient_checkpointing,
        bf16=not cpu, use_cpu=cpu,
        max_steps=workload.warmup_iterations + workload.measured_iterations, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=common.SEED, dataloader_num_workers=0,
    )
    assert config.generation_batch_size == workload.num_sequences, config.generation_batch_size
    return config


def step_timer(clock: PhaseClock, workload, budget_s: float, script_start: float, result: dict,
               rows: list[dict[str, float]]):
    """A TrainerCallback that closes each optimizer step's phases (the measured ones into `rows`) and stops
    training when `budget_s` would not fit another step."""
    from transformers import TrainerCallback

    device = clock.device
    state = {"last": None, "start": None, "step_times": []}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args_, state_, control, **kwargs):
            common.sync(device)
            state["last"] = state["start"] = time.perf_counter()
            result["setup_s"] = state["start"] - script_start  # imports, model, trainer (and vLLM's start-up)

        def on_step_end(self, args_, state_, control, **kwargs):
            common.sync(device)
            now = time.perf_counter()
            phases = dict(clock.current)
            clock.current.clear()
            phases["end_to_end"] = now - state["last"]
            state["last"] = now
            gas = phases.pop("generate_and_score", 0.0)
            phases.setdefault("logprobs", 0.0)
            phases["advantages"] = gas - phases.get("generate", 0.0) - phases.get("score", 0.0) - phases["logprobs"]
            phases["train"] = phases["end_to_end"] - gas
            phases["sync"] = 0.0
            step = state_.global_step
            kind = "warm-up" if step <= workload.warmup_iterations else "measured"
            print(f"step {step} ({kind}): " + ", ".join(f"{k} {v:.3f}s" for k, v in phases.items()), flush=True)
            state["step_times"].append(phases["end_to_end"])
            if kind == "measured":
                rows.append(phases)
            if step == workload.warmup_iterations and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            remaining = budget_s - (now - state["start"])
            if kind == "measured" and remaining < 1.1 * max(state["step_times"]):
                print(f"stopping after step {step}: {remaining:.0f}s of budget left", flush=True)
                control.should_training_stop = True

    return StepTimer()


def instrument(trainer, clock: PhaseClock) -> None:
    """Time the trainer's own generate, reward, generate-and-score and no-grad logprobs methods (docstring)."""
    clock.wrap(trainer, "_generate", "generate")
    clock.wrap(trainer, "_calculate_rewards", "score")
    original_gas = trainer._generate_and_score_completions

    def generate_and_score(*a, **kw):
        clock.in_generate_and_score = True
        try:
            return original_gas(*a, **kw)
        finally:
            clock.in_generate_and_score = False

    trainer._generate_and_score_completions = generate_and_score
    clock.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
    clock.wrap(trainer, "_get_per_token_logps_and_entropies", "logprobs",
               only_if=lambda: clock.in_generate_and_score and not torch.is_grad_enabled())


def main() -> None:
    args = parse_args()
    script_start = time.perf_counter()

    import trl
    from datasets import Dataset
    from trl import GRPOTrainer

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    cpu = device.type == "cpu"
    workload = common.CPU_WORKLOAD if cpu else common.GPU_WORKLOAD
    if args.iterations:
        workload.measured_iterations = args.iterations
    if cpu:
        torch.set_num_threads(1)
    result = {"framework": "trl", **common.environment(device), "workload": common.workload_dict(workload)}

    model = common.build_model(cpu, device)
    cfg = model.config
    num_params = sum(p.numel() for p in model.parameters())
    tokenizer = common.build_tokenizer(cfg.vocab_size, cfg.eos_token_id)
    total_iterations = workload.warmup_iterations + workload.measured_iterations
    texts = common.prompt_texts(workload, cfg.vocab_size, cfg.eos_token_id, total_iterations)
    assert all(len(tokenizer(t)["input_ids"]) == workload.prompt_len for t in texts[:4])
    config = grpo_config(workload, cpu, vllm_settings(args, model, tokenizer, workload, result))
    clock = PhaseClock(device)
    rows: list[dict[str, float]] = []
    trainer = GRPOTrainer(model=model, reward_funcs=[parity_reward], args=config,
                          train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                          callbacks=[step_timer(clock, workload, args.budget_s, script_start, result, rows)])
    instrument(trainer, clock)
    trainer.train()

    result["peak_memory_gib"] = None if cpu else torch.cuda.max_memory_allocated(device) / 2**30
    result["num_params"] = num_params
    # accelerate wraps the prepared model's forward in autocast and keeps `_original_forward`; TRL's generate
    # runs through that forward, so True means generation ran under bf16 autocast over the fp32 weights.
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    result["generation_under_autocast"] = hasattr(unwrapped, "_original_forward")
    result["measured_iterations_run"] = len(rows)
    # The device's ceilings measured here, after training, so this run records its own floors and MFU.
    result["ceilings"] = common.measure_ceilings(device)
    result.update(common.summarize(rows, workload, num_params, result["ceilings"]))
    result["floors"] = common.floors(cfg, num_params, workload, result["ceilings"])
    result["floors"]["sync_s"] = 0.0  # TRL generates with the training weights (vLLM colocate: see weight push)
    result["x_floor"] = common.over_floor(result["phases_median_s"], result["floors"])
    result["weight_sync_s"] = 0.0
    result["logprobs_pass_s"] = time_logprobs_pass(trainer, workload, cfg.vocab_size, device)
    result["trl_logged"] = [{k: v for k, v in row.items() if isinstance(v, (int, float))}
                            for row in trainer.state.log_history]
    result["config"] = {k: getattr(config, k) for k in (
        "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "generation_batch_size",
        "num_generations", "num_iterations", "max_completion_length", "generation_kwargs", "temperature", "top_p",
        "top_k", "use_vllm", "beta", "epsilon", "loss_type", "scale_rewards", "learning_rate", "lr_scheduler_type",
        "max_grad_norm", "gradient_checkpointing", "bf16", "cache_implementation", "optim")}
    result["config"]["optim"] = str(result["config"]["optim"])
    result["semantics"] = {"timing": __doc__.split("Phases are timed")[1].strip(), "trl_version": trl.__version__}
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print_summary(result, rows)


def print_summary(result: dict, rows: list[dict]) -> None:
    med, peak = result["phases_median_s"], result["peak_memory_gib"]
    print(f"\nTRL GRPOTrainer, one GRPO iteration ({result['device']}), median of {len(rows)}:")
    for phase in ("generate", "score", "advantages", "logprobs", "train", "sync", "end_to_end"):
        print(f"{phase:<12} {med.get(phase, 0.0):>9.3f}")
    print(f"generated tok/s {result.get('generated_tokens_per_s', 0):,.0f}; trained tok/s "
          f"{result.get('trained_tokens_per_s', 0):,.0f}; " + ("" if peak is None else f"peak mem {peak:.1f} GiB; ")
          + f"logprobs pass {result['logprobs_pass_s']:.3f}s")
    print("x floor: " + ", ".join(f"{phase} {ratio:.2f}" for phase, ratio in result["x_floor"].items()))


def time_logprobs_pass(trainer, workload: common.Workload, vocab: int, device, repeats: int = 2) -> float:
    """What TRL's old-logprobs pass costs on a batch of the iteration's shape (no grad, micro-batch 16, fused
    lm head), for comparison with winnow's Learner.logprobs; neither runs it at one step per iteration."""
    g = torch.Generator().manual_seed(1)
    length = workload.prompt_len + workload.new_tokens
    ids = torch.randint(10, vocab - 1, (workload.num_sequences, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    times = []
    for _ in range(repeats):
        common.sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, workload.new_tokens,
                                                       batch_size=workload.micro_batch_size)
        common.sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    main()
