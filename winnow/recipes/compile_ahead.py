"""A compile-ahead helper (`winnow.compile_ahead`): `python -m winnow.recipes.compile_ahead FOLDER NAME` replays the
RL run whose config is FOLDER/config.pickle, for its evaluation at 0 and first iteration, on a one-layer random-init
copy of its model, with only NAME's part ("engine", "learner", "learner-padded") compiled, marking in FOLDER each call
of that part it has finished. The run waits on those marks before its own calls, and finds their graphs in torch's
compile caches. NAME "kernels" launches the static decoder's Triton kernels once at the run's sizes instead."""
from __future__ import annotations

import json
import logging
import pickle
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from winnow import compile_ahead
from winnow.compile_ahead import become_helper
from winnow.loops.base import PhaseTimer, compile_seconds
from winnow.oracles.workers import die_with_parent
from winnow.recipes.base import NullLogger, load_splits
from winnow.recipes.rl import build_parts, make_rl_loop
from winnow.setup import load_tokenizer, resolve_device, setup_process, start_compile_workers
from winnow.types import Completion, RewardResult

log = logging.getLogger(__name__)


class _RandomRewards:
    """The helper's oracle: a reward in [0, 1) per completion, so every group trains (the run's own oracle may be
    a served model or a grader the helper must not call)."""

    def __init__(self, seed: int):
        self.random = random.Random(seed)

    def reward(self, prompts, completions, references, columns=None):
        return RewardResult([self.random.random() for _ in completions])

    def close(self) -> None:
        return None


class _FullLengthResponses:
    """A learner helper's actor, which samples nothing: the learner compiles for the batch's shapes, not for its
    tokens, and a one-layer random policy's lengths say nothing of the run's. Every response is `max_tokens` long (a
    micro-batch at full length is the one shape known ahead), but with `pad_last` the last, one token shorter: a
    rollout's batch is padded (responses end early, prompts differ in length), and the learner's graph for a padded
    micro-batch (with an attention mask) is not the one for a full one; the micro-batch that holds the last response
    is padded. The tokens repeat each prompt's last one; the helper's reward is random."""

    def __init__(self, actor, pad_last: bool = True):
        self.actor, self.pad_last = actor, pad_last

    def __getattr__(self, name: str):
        return getattr(self.actor, name)

    def generate(self, prompts: list[list[int]], params) -> list[Completion]:
        length = params.max_tokens
        completions = [Completion(prompt, [prompt[-1]] * length, [-1.0] * length, "length", "")
                       for prompt in prompts for _ in range(params.n)]
        if self.pad_last and completions and length > 1:
            last = completions[-1]
            completions[-1] = replace(last, response_ids=last.response_ids[:-1], logprobs=last.logprobs[:-1],
                                      finish_reason="stop")
        return completions


def learner_samples(config) -> int:
    """Responses per prompt in the learner helper's batch: fewer than the run's where its micro-batches keep their
    shape, as many as make two whole micro-batches (the learner compiles its graphs in the first ones; the rest are
    one-layer steps it would wait through). The run's own where micro-batches depend on the batch's makeup (by
    tokens or memory, prompts shared, several mini-batches) or do not divide it evenly."""
    rollout, learner = config.rollout, config.learner
    prompts, rows = rollout.prompts_per_iteration, learner.micro_batch_size
    if (learner.micro_batch_tokens or learner.micro_batch_memory or learner.share_prompts
            or learner.num_mini_batches != 1 or (prompts * rollout.num_samples) % rows):
        return rollout.num_samples
    return next((n for n in range(2, rollout.num_samples) if prompts * n >= 2 * rows and prompts * n % rows == 0),
                rollout.num_samples)


def one_layer_policy(model_config, device):
    """A random-init float32 model of `model_config.path`'s architecture with one decoder layer, on `device`."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_config.path,
                                                     trust_remote_code=model_config.trust_remote_code)
    config.num_hidden_layers = 1
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:1]
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                             trust_remote_code=model_config.trust_remote_code)


def helper_config(config, name: str):
    """The config helper `name` replays: one iteration, only its part compiled. A learner helper's engine is the
    embedded one even where the run uses vLLM (a second vLLM would take its share of the GPU): it samples nothing
    (`_FullLengthResponses`), only takes the synced weights. Its batch: for "learner", the run's prompts with fewer
    responses each where the learner's shapes allow (`learner_samples`); for "learner-padded", as many prompts as make
    one micro-batch (`compile_ahead.padded_apart`)."""
    part = compile_ahead.PART_OF[name]
    rollout = config.rollout
    if name == "learner":
        rollout = replace(rollout, num_samples=learner_samples(config))
    elif name == "learner-padded":
        rollout = replace(rollout, prompts_per_iteration=compile_ahead.padded_apart(config))
    return replace(config, num_iterations=1, compile_ahead=False, resume=None, save_final=False,
                   engine_backend="hf" if part == "learner" else config.engine_backend,
                   engine=replace(config.engine, compile_decode=config.engine.compile_decode and part == "engine"),
                   learner=replace(config.learner, compile=config.learner.compile and part == "learner",
                                   compile_dynamic=config.learner.compile_dynamic and part == "learner"),
                   rollout=rollout)


def replay_first_iteration(run_config, name: str, folder: Path) -> None:
    """The run's evaluation at 0 and first iteration, as `winnow.recipes.rl` runs them, on a one-layer policy, with
    only helper `name`'s part compiled (`helper_config`)."""
    config, part = helper_config(run_config, name), compile_ahead.PART_OF[name]
    start = time.perf_counter()
    setup_process(config.seed, config.num_threads)
    device = resolve_device(config.device)
    if device.type not in compile_ahead.DEVICE_TYPES:  # --device auto found no GPU: the run compiles nothing ahead
        log.info("compile ahead: no %s device here; nothing to compile", " or ".join(compile_ahead.DEVICE_TYPES))
        return
    start_compile_workers(device, True)
    build = PhaseTimer({"torch": time.perf_counter() - start})
    with build("tokenizer and data"):
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.path, config.model.trust_remote_code)
        train_prompts, eval_prompts = load_splits(config, tokenizer, config.eval.max_prompts)
    with build("model"):
        policy = one_layer_policy(config.model, device)
    actor, learner, critic = build_parts(config, policy, tokenizer, device, build)
    log.info("compile ahead: the %s helper built its one-layer run, %.1f s after the run spawned it (%s)", name,
             compile_ahead.seconds_since_spawn(),
             ", ".join(f"{step} {seconds:.1f} s" for step, seconds in build.seconds.items()))
    if part == "learner":  # the full micro-batch's graphs alone where another helper compiles the padded one's
        actor = _FullLengthResponses(actor, pad_last=name == "learner-padded"
                                     or compile_ahead.padded_apart(run_config) is None)
    loop = make_rl_loop(config, actor, learner, critic, _RandomRewards(config.seed), None, tokenizer, train_prompts,
                        eval_prompts, run_dir=folder / f"{name}-run", logger=NullLogger(), bar=None)
    loop.run()


def _model_sizes(model_config):
    """The model's config: its config.json read as it is where the model is a local folder (the sizes the kernels
    take; importing transformers would take the kernels helper seconds), else transformers' config."""
    path = Path(model_config.path) / "config.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        return SimpleNamespace(**raw.get("text_config", raw))
    import transformers

    loaded = transformers.AutoConfig.from_pretrained(model_config.path,
                                                     trust_remote_code=model_config.trust_remote_code)
    return loaded.get_text_config()


def compile_kernels(config) -> None:
    """The kernels helper: the static decoder's Triton kernels launched once at the run's sizes
    (`static_decode.compile_kernels`), for the rows of its first rollout and the longest prompt it takes, before the
    engine helper and the run get to them."""
    import torch

    from winnow.engines.hf import resolve_dtype
    from winnow.engines.static_decode import compile_kernels as launch_kernels

    device = resolve_device(config.device)
    if device.type != "cuda":
        log.info("compile ahead: no GPU here; no kernels to compile")
        return
    model_config = _model_sizes(config.model)
    rows = config.rollout.samples_per_iteration
    if config.engine.max_batch_size:
        rows = min(rows, config.engine.max_batch_size)
    max_len = config.data.max_prompt_tokens + config.rollout.max_tokens  # the longest a first call's rows reach
    with torch.cuda.device(device):
        launched = launch_kernels(model_config, resolve_dtype(config.engine.dtype, device), device,
                                  config.rollout.sampling_params(), rows, max_len, config.engine.attention_bucket,
                                  config.engine.min_active_rows or None)
    log.info("compile ahead: the kernels helper launched %s, %.1f s after the run spawned it",
             ", ".join(launched) or "none", compile_ahead.seconds_since_spawn())


def _main(argv: list[str]) -> int:
    die_with_parent()
    folder, name = Path(argv[0]), argv[1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with open(folder / "config.pickle", "rb") as f:
        spec: dict[str, Any] = pickle.load(f)
    become_helper(name, folder, spec["device_types"], spec["spawned_at"], compile_seconds)
    log.info("compile ahead: the %s helper imported, %.1f s after the run spawned it", name,
             compile_ahead.seconds_since_spawn())
    if name == "kernels":
        compile_kernels(spec["config"])
    else:
        replay_first_iteration(spec["config"], name, folder)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
