"""Tiny models for CPU development: a character tokenizer trained locally and a Qwen2-shaped model from a config.

Nothing here downloads. The tokenizer is character-level for ASCII text, but stored in the byte-level BPE form
(byte alphabet, no merges) that Qwen2's tokenizer uses. Why: transformers 5 makes
`AutoTokenizer.from_pretrained(dir)` of any folder whose config.json says `qwen2` return a `Qwen2Tokenizer`,
ignoring `tokenizer_class` in tokenizer_config.json, and that class rebuilds the pipeline from the vocab
(Qwen's pre-tokenizer regex, byte-level, BPE with the saved merges). A WordLevel character tokenizer comes out
of that rebuild with spaces and newlines silently dropped; a byte-level tokenizer with no merges comes out
identical, so every loader (`PreTrainedTokenizerFast`, `AutoTokenizer`, vLLM's) gives the same ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from winnow.lazy import lazy_import

if TYPE_CHECKING:
    from transformers import PreTrainedModel

torch = lazy_import("torch")
transformers = lazy_import("transformers")

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
"""ids 0, 1, 2 in every tokenizer `train_char_tokenizer` builds; characters follow from id 3"""


def train_char_tokenizer(
    texts: Iterable[str], save_dir: str | Path | None = None, *, include_all_bytes: bool = False
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose vocabulary is the characters (bytes) seen in `texts`.

    Ids: <pad>=0, <eos>=1, <unk>=2, then one id per byte in the byte-level alphabet's order (digits are
    consecutive). No BOS token. Characters never seen become <unk> here, while a `Qwen2Tokenizer` rebuild
    (see the module docstring) drops them: train on every text the model will see, or set
    `include_all_bytes` (all 256 bytes; vocabulary 259) to rule out unknowns entirely.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # NFC and a regex-free ByteLevel: exactly what Qwen2Tokenizer applies, so a rebuild changes nothing.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()  # concatenates: decode(encode(s)) == s, no inserted spaces
    trainer = trainers.BpeTrainer(
        vocab_size=1,  # below the alphabet size: the trainer keeps the alphabet and learns no merges
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if include_all_bytes else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        save_tokenizer(wrapped, save_dir)
    return wrapped


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, save_dir: str | Path) -> Path:
    """`save_pretrained`, recording the class as `PreTrainedTokenizerFast`, a name that transformers 4.x
    (vLLM's pin) and 5.x both load; 5.x would otherwise write `TokenizersBackend`, unknown to 4.x."""
    save_dir = Path(save_dir)
    tokenizer.save_pretrained(save_dir)
    config_path = save_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return save_dir


def tiny_qwen2_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 512,
    max_position_embeddings: int = 128,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Qwen2Config:
    """A Qwen2 config of ~0.5M parameters (with a character vocabulary) at the defaults.

    head_dim = hidden_size / num_heads = 64 on purpose: vLLM's CPU build rejects head_dim 16 and accepts 64.
    Embeddings are tied. `max_position_embeddings` bounds prompt + response in vLLM (its max_model_len):
    raise it for long templates (the r1 template alone is ~330 characters).
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must divide by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    return transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised float32 Qwen2 model sized to `tokenizer`; `overrides` go to `tiny_qwen2_config`.

    The same seed gives the same weights; the global torch RNG is left as it was.
    """
    config = tiny_qwen2_config(
        len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, save_dir: str | Path) -> Path:
    """Save model and tokenizer into one folder that `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained` (or `PreTrainedTokenizerFast.from_pretrained`) load offline."""
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir)
    save_tokenizer(tokenizer, save_dir)
    return save_dir


def load_tiny(save_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load what `save_tiny` wrote (float32, eval mode)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    return model, transformers.PreTrainedTokenizerFast.from_pretrained(save_dir)
