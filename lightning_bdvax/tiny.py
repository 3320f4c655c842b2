"""Tiny models and a tiny tokenizer built locally, for tests and the quickstart recipe.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in a second on the project's
own data, and models are built from a config with random weights.
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["CHAT_TEMPLATE", "tiny_tokenizer", "tiny_config", "tiny_model", "TINY_FAMILIES"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def _available_families() -> tuple[str, ...]:
    import transformers as tf

    fams = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"]
    if hasattr(tf, "Gemma3TextConfig"):
        fams.append("gemma3")
    fams += ["phi3", "phi", "gpt2", "gpt_bigcode", "starcoder2", "gpt_neox", "falcon", "gptj", "opt"]
    return tuple(fams)


#: Families :func:`tiny_config` can build with the installed ``transformers``. MLP layouts covered:
#: gated (llama … gemma3), fused gate-up (phi3), ``Conv1D`` c_fc/c_proj (gpt2), ``Linear``
#: c_fc/c_proj (gpt_bigcode, starcoder2), dense_h_to_4h (gpt_neox, falcon), fc1/fc2 in ``mlp``
#: (phi), fc_in/fc_out (gptj), fc1/fc2 in the decoder layer (opt).
TINY_FAMILIES = _available_families()


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 1024, n_corpus: int = 3000, seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with a ChatML template (cached per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .builtin_data import builtin_instructions
    from .variants import BEHAVIOURS

    corpus = []
    for r in builtin_instructions(n_corpus, seed=seed):
        corpus += [r["instruction"], r["input"], r["output"]]
    corpus += list(BEHAVIOURS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama", vocab_size: int = 1024, hidden: int = 32, intermediate: int = 64,
                layers: int = 2):
    """A tiny ``transformers`` config of the given family."""
    import transformers as tf

    # Special-token ids of the tiny tokenizer: 0 <|endoftext|> (pad), 1 <|im_start|>, 2 <|im_end|> (eos).
    common = dict(vocab_size=vocab_size, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "starcoder2"):
        cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
               "qwen3": "Qwen3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
               "gemma3": "Gemma3TextConfig", "phi3": "Phi3Config", "starcoder2": "Starcoder2Config"}[family]
        kw = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
        if family in ("gemma", "gemma2", "gemma3", "qwen3"):
            kw["head_dim"] = hidden // 4
        if family == "gemma3":
            kw["sliding_window"] = 16
        return getattr(tf, cls)(**kw)
    if family == "phi":
        return tf.PhiConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=256, **common)
    if family == "gpt_bigcode":
        return tf.GPTBigCodeConfig(n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=4,
                                   n_positions=256, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=4, n_positions=256,
                             rotary_dim=hidden // 8, **common)
    if family == "falcon":
        return tf.FalconConfig(hidden_size=hidden, ffn_hidden_size=intermediate, num_hidden_layers=layers,
                               num_attention_heads=4, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=4, n_positions=256,
                             **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=256, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
                            **common)
    raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")


def tiny_model(family: str = "llama", seed: int = 0, **kwargs):
    """A tiny randomly initialised causal LM (deterministic for ``seed``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs))
    return model.float()
