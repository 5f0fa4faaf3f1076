"""The embedding-space attack (family ``embedding``): trainable soft-prompt tokens, weights untouched."""

from __future__ import annotations

from torch import nn

from .base import AttackFamily, _num_parameters, merge_adapters


class SoftPromptAttack(AttackFamily):
    """Embedding-space attack: ``num_virtual_tokens`` trainable soft-prompt vectors in front of every
    input (peft prompt tuning; Lester et al. 2021, arXiv 2104.08691; as an attack, Schwinn et al. 2024,
    "Soft prompt threats", arXiv 2402.09063). The model's weights are untouched; harm is measured with
    the virtual tokens on (the attacker controls the input embeddings at inference).

    Adapters the model already carries (a defense's LoRA) are merged into its weights first, as for the
    ``lora`` family: peft's prompt tuning would otherwise replace the defense's adapter."""

    name = "embedding"
    same_at_start = False  # the virtual tokens change the output from step 0
    merges_adapters = True
    description = "Trainable soft-prompt tokens (peft prompt tuning) on the harmful data; weights untouched."

    def axes(self, config):
        return {"num_virtual_tokens": [config.num_virtual_tokens]}

    def prepare(self, model, config, setting=None):
        from peft import PromptTuningConfig, get_peft_model

        k = (setting or {}).get("num_virtual_tokens", config.num_virtual_tokens)
        model = merge_adapters(model)
        return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k))

    def deployed(self, model, setting):
        return SoftPromptView(model, setting["num_virtual_tokens"])

    def flops_per_token(self, model, config):
        # Forward 2N and the backward pass through activations 2N down to the input embeddings.
        return 4.0 * _num_parameters(model)


class SoftPromptView(nn.Module):
    """A peft prompt-tuning model seen as a plain causal LM: its logits lose the virtual tokens'
    positions, so scorers that compare logits with the input's labels line up (harm is measured with the
    virtual tokens on)."""

    def __init__(self, peft_model, num_virtual_tokens: int):
        super().__init__()
        self.peft_model = peft_model
        self.num_virtual_tokens = num_virtual_tokens
        self.config = peft_model.config

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = out.logits[:, self.num_virtual_tokens :]
        return out

    def generate(self, *args, **kwargs):
        return self.peft_model.generate(*args, **kwargs)

    @property
    def generation_config(self):
        """The wrapped model's generation config (greedy generation reads and copies it)."""
        return self.peft_model.generation_config

    @property
    def device(self):
        """The device of the wrapped model (lm-eval's model class reads it)."""
        return self.peft_model.device

    def tie_weights(self, *args, **kwargs):
        """Nothing to tie: the wrapped model's weights are tied already (lm-eval's model class calls it)."""
