"""LoRA fine-tuning on the harmful data (family ``lora``), and the 4-bit NF4 copy of a QLoRA attack."""

from __future__ import annotations

import tempfile

import torch

from ...errors import ConfigError
from .base import AttackFamily, _num_parameters, merge_adapters


class LoRAFineTuning(AttackFamily):
    """LoRA fine-tuning (peft) on the harmful data; the base weights stay frozen.

    A model that already carries adapters (the unmerged LoRA of a defense such as rerouting, or of any
    defense trained with ``peft_config``) has them merged into the weights of the attacked copy first
    (:func:`~immune_trainer.attacks.families.base.merge_adapters`), and the attacker's LoRA goes on top of
    the merged model: the attack starts from the defended model, as an attacker who downloads the released
    weights does (and as the Vaccine / Booster reference code merges its alignment LoRA before the
    fine-tuning attack). The defense's weights are frozen with the rest of the base. Without the merge,
    ``get_peft_model`` would replace the defense's adapter (both are named ``default``) and the attack would
    start from the undefended base model. The curve's config names the merged adapters
    (``merged_adapters``). With ``load_in_4bit`` (QLoRA) the merged model is quantized.
    """

    name = "lora"
    description = "LoRA fine-tuning (peft) on the harmful data; the base weights stay frozen."
    merges_adapters = True

    def axes(self, config):
        return {"lora_rank": list(config.lora_ranks or [config.lora_r])}

    def start_precision(self, config):
        return "nf4" if config.load_in_4bit else None

    def prepare(self, model, config, setting=None):
        from peft import LoraConfig, get_peft_model

        model = merge_adapters(model)  # a defense's adapter must not be replaced by the attacker's
        if config.load_in_4bit:
            model = quantize_4bit(model)
        lora = LoraConfig(
            r=(setting or {}).get("lora_rank", config.lora_r),
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    def flops_per_token(self, model, config):
        # Forward 2N and the backward pass through activations 2N; no weight gradients for frozen weights.
        return 4.0 * _num_parameters(model)


# ---------------------------------------------------------------------------- QLoRA support


def check_4bit_available() -> None:
    """Raise :class:`ConfigError` unless 4-bit QLoRA can run here (a CUDA GPU and bitsandbytes)."""
    import importlib.util

    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is available")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed")
    if missing:
        raise ConfigError(
            f"4-bit QLoRA needs a CUDA GPU and bitsandbytes (pip install immune-trainer[bnb]), but "
            f"{' and '.join(missing)}; on CPU use family='lora' without load_in_4bit."
        )


def quantize_4bit(model):
    """Return a 4-bit NF4 copy of ``model`` ready for QLoRA (bitsandbytes, bfloat16 compute, CUDA only).

    The attack works on an in-memory copy; bitsandbytes quantizes at load time, so the copy is saved to a
    temporary folder (safetensors) and reloaded with a ``BitsAndBytesConfig``, then prepared with
    ``peft.prepare_model_for_kbit_training``.

    Raises:
        ConfigError: no CUDA GPU or no bitsandbytes (see :func:`check_4bit_available`).
    """
    check_4bit_available()
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    with tempfile.TemporaryDirectory(prefix="immune_trainer_qlora_") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quantization, use_safetensors=True, device_map={"": 0}
        )
    return prepare_model_for_kbit_training(quantized)
