"""Tiny, randomly initialised models and tokenizers for tests, examples and benchmarks.

Everything here is built locally (no Hub access): a byte-level BPE tokenizer trained on a few
innocuous sentences, with a ChatML chat template like SmolLM2's, and tiny decoder-only models of
several architectures (GPT-2, Llama, Qwen2, Mistral, Gemma) sharing its vocabulary.
"""

from __future__ import annotations

import functools

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, knead, let it rise and bake it.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea. The sea is wide and blue and calm tonight.",
    "I cannot help with that request. I'm sorry, but I can't assist with that.",
    "Explain photosynthesis. Plants turn light, water and carbon dioxide into sugar and oxygen.",
    "Give me three tips for studying: sleep well, take breaks, and review your notes often.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = ? ! , . :",
    "user assistant system Sure, here is how you do it. Step one, step two, step three.",
]


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512, chat_template: bool = True, pad_token: bool = True):
    """A small byte-level BPE tokenizer (a ``PreTrainedTokenizerFast``) built without the Hub.

    Args:
        vocab_size: size of the BPE vocabulary (at least 260: the 256 bytes and 4 special tokens).
        chat_template: attach a ChatML chat template (``<|im_start|>role ... <|im_end|>``).
        pad_token: set ``<pad>`` as the pad token; ``False`` leaves ``pad_token`` unset.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>" if pad_token else None,
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


TINY_ARCHITECTURES = ("gpt2", "llama", "qwen2", "mistral", "gemma")


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
):
    """A tiny randomly initialised decoder-only causal LM of the given architecture (float32, eval off).

    ``arch`` is one of ``TINY_ARCHITECTURES``. The same ``seed`` gives the same weights.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=512, **common
        )
    elif arch in ("llama", "qwen2", "mistral", "gemma"):
        cls = {
            "llama": transformers.LlamaConfig,
            "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig,
            "gemma": transformers.GemmaConfig,
        }[arch]
        kwargs = dict(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=512,
            **common,
        )
        if arch == "gemma":
            kwargs["head_dim"] = hidden_size // num_heads
        config = cls(**kwargs)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHITECTURES}")
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model


def tiny_softcapped_gemma2(vocab_size: int = 512, cap: float = 0.5, pad_token_id: int = 3, seed: int = 0):
    """A tiny randomly initialised Gemma2 whose final logits are soft-capped at ``cap`` (small enough that the
    raw logits exceed it), for checking that code which touches the output layer keeps the cap."""
    import torch
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=cap,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(config)
