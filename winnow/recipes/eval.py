"""`winnow eval`: held-out accuracy of a saved model, without training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from winnow.data import DataConfig, load_prompts
from winnow.engines import make_engine
from winnow.engines.hf import HFEngineConfig
from winnow.engines.vllm import VLLMEngineConfig
from winnow.eval.accuracy import evaluate_accuracy
from winnow.loops.config import EvalConfig
from winnow.oracles import OracleConfig, check_oracle_config, make_oracle
from winnow.recipes.base import check_answers
from winnow.setup import ModelConfig, load_policy, resolve_device, setup_process


@dataclass
class EvalRunConfig:
    """Evaluate a model on a dataset's held-out split."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: HFEngineConfig = field(default_factory=HFEngineConfig)
    engine_backend: Literal["hf", "vllm"] = "hf"
    """what samples the responses: "hf" (embedded, settings in `engine`) or "vllm" (settings in `vllm_engine`)"""
    vllm_engine: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)
    """settings of the vllm engine, used when engine_backend is \"vllm\""""
    max_tokens: int = 256
    """generation budget per response"""
    split: str = "eval"
    """which split of the data to score: "eval" (held-out) or "train\""""
    seed: int = 0
    """seed of the sampled (mean@k) responses"""
    device: str = "auto"
    """"auto", "cpu" or "cuda[:N]\""""
    num_threads: int | None = None
    """torch CPU threads; None uses OMP_NUM_THREADS if set, else min(4, cores)"""


def run_eval(config: EvalRunConfig) -> dict[str, float]:
    check_oracle_config(config.oracle, default=EvalRunConfig().oracle, needs="reward")
    setup_process(config.seed, config.num_threads)
    model, tokenizer = load_policy(config.model)
    prompts = load_prompts(config.data, tokenizer, config.split)[: config.eval.max_prompts]
    engine = make_engine(config.engine_backend, model if config.engine_backend == "hf" else None, tokenizer,
                         model_path=config.model.path, tokenizer_path=config.model.tokenizer, hf=config.engine,
                         vllm=config.vllm_engine, device=resolve_device(config.device), copy_model=False)
    oracle = make_oracle(config.oracle, needs="reward")
    try:
        check_answers(oracle, prompts, config.data.eval or config.data.train)
        return evaluate_accuracy(
            engine, oracle, prompts, max_tokens=config.eval.max_tokens or config.max_tokens,
            greedy=config.eval.greedy, k=config.eval.k, temperature=config.eval.temperature,
            correct_threshold=config.eval.correct_threshold, seed=config.seed,
        ).metrics
    finally:
        oracle.close()
