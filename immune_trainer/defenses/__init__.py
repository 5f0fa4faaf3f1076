"""The defenses: one config/trainer pair per method, registered by name.

``get_defense("gradient_ascent")`` returns a :class:`DefenseSpec` with the config class, the trainer
class, the paper and an optional attack-time hook (for defenses such as Security Vectors that only
protect while something is applied during fine-tuning). The CLI's ``immunize --defense NAME`` and the
model cards of :mod:`immune_trainer.hub` find defenses through this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..trainer import check_search_space


@dataclass(frozen=True)
class DefenseSpec:
    """What the registry knows about a defense."""

    name: str
    config_class: type
    trainer_class: type
    description: str = ""
    # A factory: attack_time_hook(path_to_the_defense_output) -> hook(model) -> model, applied to each
    # attacked copy (HarmfulFineTuningAttack.run(prepare_model=hook), evaluate_conditions(prepare_immunized=
    # hook)); hook.measure(model), if present, is the context in which harm is measured (e.g. without a
    # security vector, as at inference); hook.cache_key, if present, keys saved attack runs.
    attack_time_hook: Callable[[Any], Any] | None = field(default=None)

    @property
    def paper(self) -> dict:
        return getattr(self.trainer_class, "_paper", {})

    @property
    def search_space(self) -> dict:
        """The config's hyperparameter search space (``config_class.search_space()``)."""
        return self.config_class.search_space()


DEFENSES: dict[str, DefenseSpec] = {}


def register_defense(
    name: str,
    config_class: type,
    trainer_class: type,
    description: str = "",
    attack_time_hook: Callable[[Any], Any] | None = None,
) -> DefenseSpec:
    """Register a defense under ``name`` (lower-case, unique). Its config's ``search_space()`` is validated
    here (see :func:`immune_trainer.trainer.check_search_space`); the trainer class records ``name`` as its
    ``_defense_name`` (the first name it is registered under), which its model card states."""
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ConfigError(f"defense names are lower-case identifiers, got {name!r}.")
    if name in DEFENSES:
        raise ConfigError(f"a defense named {name!r} is already registered.")
    check_search_space(config_class)
    spec = DefenseSpec(name, config_class, trainer_class, description, attack_time_hook)
    DEFENSES[name] = spec
    if isinstance(trainer_class, type) and vars(trainer_class).get("_defense_name") is None:
        # The trainer's model card names the defense by the first name its class is registered under.
        trainer_class._defense_name = name
    return spec


def get_defense(name: str) -> DefenseSpec:
    """The registered defense called ``name``; unknown names raise ConfigError listing the known ones."""
    key = name.lower().replace("-", "_")
    if key not in DEFENSES:
        raise ConfigError(f"unknown defense {name!r}; known defenses: {', '.join(sorted(DEFENSES))}.")
    return DEFENSES[key]


def list_defenses() -> list[str]:
    return sorted(DEFENSES)


from .gradient_ascent import GradientAscentConfig, GradientAscentTrainer  # noqa: E402

register_defense(
    "gradient_ascent",
    GradientAscentConfig,
    GradientAscentTrainer,
    "Bounded gradient ascent on harmful responses with retain losses (RepNoise's ascent term alone).",
)

# --- RepNoise, Vaccine, Booster (registered below this line) ---
from .booster import BoosterConfig, BoosterTrainer  # noqa: E402
from .repnoise import RepNoiseConfig, RepNoiseTrainer  # noqa: E402
from .vaccine import VaccineConfig, VaccineTrainer  # noqa: E402

register_defense(
    "repnoise",
    RepNoiseConfig,
    RepNoiseTrainer,
    "Representation noising: push harmful MLP activations towards Gaussian noise (MMD) with a bounded "
    "logit-lens ascent on harmful responses and a retain loss (Rosati et al. 2024).",
)
register_defense(
    "vaccine",
    VaccineConfig,
    VaccineTrainer,
    "Perturbation-aware alignment: train on refusals under the worst-case hidden-state perturbation "
    "(Huang et al. 2024); layer_sampling=True gives T-Vaccine.",
)
register_defense(
    "booster",
    BoosterConfig,
    BoosterTrainer,
    "Attenuate the harmful perturbation: keep the harmful loss from dropping after a simulated harmful "
    "step (Huang et al. 2024).",
)

# --- TAR, Security Vectors, representation rerouting (registered below this line) ---
from .rerouting import ReroutingConfig, ReroutingTrainer  # noqa: E402
from .security_vectors import (  # noqa: E402
    SecurityVectorConfig,
    SecurityVectorTrainer,
    drop_security_vector,
    security_vector_hook,
    without_security_vector,
)
from .tar import TARConfig, TARTrainer  # noqa: E402

register_defense(
    "tar",
    TARConfig,
    TARTrainer,
    "Tamper-resistant training: first-order meta-learning against simulated fine-tuning attackers (the "
    "reference's learning rates and warm-up adversary; a DPO refusal-preference tamper-resistance loss by "
    "default, or max-entropy) with LM and representation retain losses.",
)
register_defense(
    "security_vectors",
    SecurityVectorConfig,
    SecurityVectorTrainer,
    "A LoRA trained on harmful data, applied frozen during any later fine-tuning and dropped at inference; "
    "protects only while it is applied.",
    attack_time_hook=security_vector_hook,
)
register_defense(
    "rerouting",
    ReroutingConfig,
    ReroutingTrainer,
    "Circuit breakers: LoRA rerouting of harmful representations (ReLU cosine, request and response) with an L2 "
    "retain loss on every layer up to the last target layer.",
)

# --- CRL (contrastive representation learning, triplet) ---
from .crl import CRLConfig, CRLTrainer  # noqa: E402

register_defense(
    "crl",
    CRLConfig,
    CRLTrainer,
    "Contrastive representation learning: LoRA triplet losses on response-token hidden states (harmful pushed "
    "from the original and toward the harmful centroid, cosine margins) + KL to the original on benign data "
    "(Simko et al. 2025).",
)

# --- SEAM, CTRAP, SDD (self-destructive defenses and SDD) ---
from .seam import SEAMConfig, SEAMTrainer  # noqa: E402

register_defense(
    "seam",
    SEAMConfig,
    SEAMTrainer,
    "Self-destructive model: harmful and benign gradients coupled to point in opposite directions "
    "(cos(g_harmful, g_benign), Hessian-free estimate) with bounded ascent on harmful data and refusal CE "
    "(Wang et al. 2025); needs a retain (benign) set.",
)
from .ctrap import CTRAPConfig, CTRAPTrainer  # noqa: E402

register_defense(
    "ctrap",
    CTRAPConfig,
    CTRAPTrainer,
    "Collapse trap: alignment + lambda x collapse loss (predict one fixed token) after a simulated harmful "
    "update, so that harmful fine-tuning collapses the model (Yi, Huang et al. 2025).",
)
from .sdd import SDDConfig, SDDTrainer, sdd_dataset  # noqa: E402

register_defense(
    "sdd",
    SDDConfig,
    SDDTrainer,
    "Self-degraded defense: supervised fine-tuning on harmful prompts answered by high-quality but irrelevant "
    "benign responses (Chen et al. 2025, TamperBench's defenses/sdd); needs a retain (benign) set.",
)

__all__ = [
    "DEFENSES",
    "BoosterConfig",
    "BoosterTrainer",
    "CRLConfig",
    "CTRAPConfig",
    "CTRAPTrainer",
    "CRLTrainer",
    "DefenseSpec",
    "GradientAscentConfig",
    "GradientAscentTrainer",
    "RepNoiseConfig",
    "RepNoiseTrainer",
    "ReroutingConfig",
    "ReroutingTrainer",
    "SDDConfig",
    "SDDTrainer",
    "SEAMConfig",
    "SEAMTrainer",
    "SecurityVectorConfig",
    "SecurityVectorTrainer",
    "TARConfig",
    "TARTrainer",
    "VaccineConfig",
    "VaccineTrainer",
    "check_search_space",
    "drop_security_vector",
    "get_defense",
    "list_defenses",
    "register_defense",
    "sdd_dataset",
    "security_vector_hook",
    "without_security_vector",
]
