"""A compile-ahead helper (`winnow.compile_ahead`): `python -m winnow.recipes.compile_ahead FOLDER PART` replays the
RL run whose config is FOLDER/config.pickle, for its evaluation at 0 and first iteration, on a one-layer random-init
copy of its model, with only PART ("engine" or "learner") compiled, marking in FOLDER each call of PART it has
finished. The run waits on those marks before its own calls, and finds their graphs in torch's compile caches."""
from __future__ import annotations

import logging
import pickle
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
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
    """The learner helper's actor, which samples nothing: the learner compiles for the batch's shapes, not for its
    tokens, and a one-layer random policy's lengths say nothing of the run's. Every response is `max_tokens` long (a
    micro-batch at full length is the one shape known ahead) but the last, one token shorter: a rollout's batch is
    padded (responses end early, prompts differ in length), and the learner's graph for a padded micro-batch (with an
    attention mask) is not the one for a full one; the helper's batch then has both kinds. The tokens repeat each
    prompt's last one; the helper's reward is random."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name: str):
        return getattr(self.actor, name)

    def generate(self, prompts: list[list[int]], params) -> list[Completion]:
        length = params.max_tokens
        completions = [Completion(prompt, [prompt[-1]] * length, [-1.0] * length, "length", "")
                       for prompt in prompts for _ in range(params.n)]
        if completions and length > 1:
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


def replay_first_iteration(config, part: str, folder: Path) -> None:
    """The run's evaluation at 0 and first iteration, as `winnow.recipes.rl` runs them, on a one-layer policy, with
    only `part` compiled."""
    # The learner helper's engine is the embedded one even where the run uses vLLM (a second vLLM would take its
    # share of the GPU): it samples nothing (`_FullLengthResponses`), only takes the synced weights. Its batch has
    # fewer responses per prompt where the learner's shapes allow (`learner_samples`).
    config = replace(config, num_iterations=1, compile_ahead=False, resume=None, save_final=False,
                     engine_backend="hf" if part == "learner" else config.engine_backend,
                     engine=replace(config.engine, compile_decode=config.engine.compile_decode and part == "engine"),
                     learner=replace(config.learner, compile=config.learner.compile and part == "learner",
                                     compile_dynamic=config.learner.compile_dynamic and part == "learner"),
                     rollout=replace(config.rollout, num_samples=learner_samples(config) if part == "learner"
                                     else config.rollout.num_samples))
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
    log.info("compile ahead: the %s helper built its one-layer run, %.1f s after the run spawned it (%s)", part,
             compile_ahead.seconds_since_spawn(),
             ", ".join(f"{name} {seconds:.1f} s" for name, seconds in build.seconds.items()))
    if part == "learner":
        actor = _FullLengthResponses(actor)
    loop = make_rl_loop(config, actor, learner, critic, _RandomRewards(config.seed), None, tokenizer, train_prompts,
                        eval_prompts, run_dir=folder / f"{part}-run", logger=NullLogger(), bar=None)
    loop.run()


def _main(argv: list[str]) -> int:
    die_with_parent()
    folder, part = Path(argv[0]), argv[1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with open(folder / "config.pickle", "rb") as f:
        spec: dict[str, Any] = pickle.load(f)
    become_helper(part, folder, spec["device_types"], spec["spawned_at"], compile_seconds)
    log.info("compile ahead: the %s helper imported, %.1f s after the run spawned it", part,
             compile_ahead.seconds_since_spawn())
    replay_first_iteration(spec["config"], part, folder)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
