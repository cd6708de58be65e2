"""LoRA through `peft`: train low-rank adapters on a frozen policy (Hu et al. 2021, "LoRA").

    apply_lora(model, config)   wrap the policy with `peft.get_peft_model`; only adapters are trainable
    adapters_off(model)         the reference policy: the same model with its adapters disabled
    merged_weights(model)       what the engine gets: W + (alpha / rank) * B @ A under the base model's names
    save_merged(model, path)    a plain `from_pretrained` checkpoint with the adapters merged, and the adapter

Why the reference is "adapters off" and not a copy: the base weights never change under LoRA, so the model
with its adapters disabled *is* the initial policy; KL terms (GRPO's `kl_coef`) and DPO's reference read it
from the same weights and save a whole frozen copy of the model.
Why the engine gets merged weights: an engine (hf or vLLM) runs a plain model with the base model's parameter
names; merging on the way out keeps it unaware of LoRA and as fast as without it. The merged tensors are
computed from the adapters, never written into the trained model, so training continues on the unmerged one.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterator

from winnow.lazy import lazy_import, no_grad

torch = lazy_import("torch")

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""the attention and MLP projections of Llama-, Qwen- and Mistral-style decoders"""


def _alias(flag: str):
    # A short flag beside tyro's nested one (`--lora-rank` and `--lora.rank` both work). tyro is the CLI's
    # parser; without it (a bare GPU image running a benchmark) the learner still imports.
    try:
        import tyro
    except ImportError:
        return None
    return tyro.conf.arg(aliases=(flag,))


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (pip install "winnow[lora]"); rank 0 trains the full model."""

    rank: Annotated[int, _alias("--lora-rank")] = 0
    """rank r of the adapters; 0 turns LoRA off (full fine-tuning)"""
    alpha: Annotated[float, _alias("--lora-alpha")] = 16.0
    """scaling numerator: the update is (alpha / rank) * B @ A"""
    dropout: Annotated[float, _alias("--lora-dropout")] = 0.0
    """dropout on the adapters' input while training (off in the engine and in logprob recomputation)"""
    target_modules: Annotated[list[str], _alias("--lora-target-modules")] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """module names (suffixes) that get adapters; ["all-linear"] targets every linear layer but the output head"""
    modules_to_save: Annotated[list[str], _alias("--lora-modules-to-save")] = field(default_factory=list)
    """modules trained in full beside the adapters (e.g. "lm_head"); they are copied, so they cost memory"""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank} must be >= 0 (0 is off)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.enabled and not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the modules that get adapters, or use all-linear")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError('LoRA (--lora-rank > 0) needs peft: pip install "winnow[lora]"') from e
    return peft


def is_lora(model: torch.nn.Module) -> bool:
    """True when `model` is a peft model (checked without importing peft when it is not installed)."""
    return any(cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def apply_lora(model: torch.nn.Module, config: LoraConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """`model` wrapped with LoRA adapters as `config` says (the base weights frozen), or `model` itself when
    `config.rank` is 0. Logs the trainable parameter count. `task_type` is PEFT's: "SEQ_CLS" for a reward model."""
    if not config.enabled:
        return model
    peft = _peft()
    targets = "all-linear" if config.target_modules == ["all-linear"] else list(config.target_modules)
    peft_config = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        modules_to_save=list(config.modules_to_save) or None, bias="none", task_type=task_type,
    )
    model = peft.get_peft_model(model, peft_config)
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_total = sum(p.numel() for p in model.parameters())
    log.info("LoRA rank %d, alpha %g on %s: %d trainable parameters of %d (%.2f%%)", config.rank, config.alpha,
             targets, num_trainable, num_total, 100 * num_trainable / max(num_total, 1))
    return model


def adapters_off(model: torch.nn.Module):
    """Context in which `model` computes as its base model (LoRA's reference policy)."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


@no_grad
def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy as a plain model: (name, tensor) under the base model's `named_parameters()` names, with
    every active adapter merged into its layer's weight (W + scaling * B @ A) and a `modules_to_save` module's
    trained copy in place of the original. No `base_model.model.` prefix, no lora_A / lora_B entries.
    The model is not modified; one merged tensor is built at a time."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    seen: set[int] = set()  # tied parameters (embeddings = output head) once, as named_parameters() does

    def walk(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(module, LoraLayer):
            adapters = [] if module.merged or module.disable_adapters else module.active_adapters
            for name, param in module.get_base_layer().named_parameters():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                tensor = param.detach()
                if name == "weight":
                    for adapter in adapters:
                        if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                            tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
                yield prefix + name, tensor
            return
        if isinstance(module, ModulesToSaveWrapper):
            active = None if module.disable_adapters else module.active_adapters[0]
            module = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield prefix + name, param.detach()
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    yield from walk(model.get_base_model(), "")


def save_merged(model: torch.nn.Module, path: Path) -> None:
    """Write the merged policy to `path` (loadable with `AutoModelForCausalLM.from_pretrained(path)`) and
    the adapter alone to `path/adapter` (loadable with `peft.PeftModel.from_pretrained(base, path/adapter)`)."""
    base = model.get_base_model()
    base.save_pretrained(path, state_dict=dict(merged_weights(model)))
    model.save_pretrained(path / "adapter")
