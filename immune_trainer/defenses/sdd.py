"""SDD: self-degraded defense (Chen, Lu, Lin and Zeng, ACL 2025, arXiv 2507.21182).

SDD fine-tunes the model to answer harmful prompts with high-quality but IRRELEVANT responses (answers to
other, benign questions). A model trained so has learned to meet harmful requests with unrelated text;
an attacker who later fine-tunes it on harmful data degrades its general capability along with the
irrelevance (the paper's "self-degradation"). The defense is a data transform plus plain supervised
fine-tuning on the transformed pairs:

1. for each harmful prompt, draw a response from a pool of benign responses, and redraw (up to
   ``max_resample_attempts`` times) while the cosine similarity of prompt and response is above
   ``similarity_threshold``; if no draw is below it, keep the least similar one seen;
2. minimise the response CE of ``(harmful prompt, irrelevant response)`` (``SDD_reject``, with
   ``use_reject_prefix=True``: the response starts with the paper's refusal sentence).

The harmful responses are never trained on: they stay on the harmful side of each pair only for the
library's evaluation logs.

From TamperBench's ``defenses/sdd`` (``sdd.py``, ``dataset.py``; their reference is the ZeroNLP/SDD
repository): threshold 0.25, 50 draws, seed 42, completion-only SFT at lr 5e-7 with a constant
schedule, 500 steps of batch 24 over 8000 pairs, max length 512 (``SDDConfig.reference()`` sets the
schedule, steps and batch).

Departures from the reference:

- similarity: the reference embeds prompt and response with SentenceBERT (``all-MiniLM-L6-v2``), which
  needs the Hub. Here the default is a lexical cosine (word counts, lower-cased, over ``\\w+`` words:
  0 when the two share no word), which works offline; its scale is not SentenceBERT's, so the 0.25
  threshold is stricter than it reads. In Python, pass ``embed=`` (a function from a list of texts to
  L2-normalised vectors, e.g. ``SentenceTransformer("all-MiniLM-L6-v2").encode(texts,
  normalize_embeddings=True)``) to :class:`SDDTrainer` or :func:`sdd_dataset` to use the reference's.
- benign responses: the reference pools Alpaca's and LIMA's responses; here they are the responses of
  the trainer's ``retain_dataset`` (required; any supported format). It is used only as this pool: the
  retain CE term of the other defenses is off by default (``retain_weight=0``). A benign response equal
  to the row's harmful response is never drawn.
- harmful prompts: the reference samples BeaverTails category-balanced; here they are the harmful
  dataset's prompts as given (balance them beforehand, e.g. with ``data.split_by_category``).
- the reference formats with the model's chat template through trl's SFTTrainer; here the library's
  own tokenization (the chat template when the tokenizer has one) and response-only labels.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np

from ..errors import ConfigError, DataError
from ..trainer import ImmunizationConfig, ImmunizationTrainer

SDD_PAPER = {
    "title": "SDD: Self-Degraded Defense against Malicious Fine-tuning",
    "id": "2507.21182",
    "citation": (
        "@inproceedings{chen2025sdd,\n"
        "  title={{SDD}: Self-Degraded Defense against Malicious Fine-tuning},\n"
        "  author={Chen, ZiXuan and Lu, Weikai and Lin, Xin and Zeng, Ziqian},\n"
        "  booktitle={Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics "
        "(Volume 1: Long Papers)},\n"
        "  pages={29109--29125},\n"
        "  year={2025}\n}"
    ),
}

#: The refusal sentence of the paper's SDD_reject variant (as TamperBench has it).
SDD_REJECT_PREFIX = (
    "I refuse to answer your question for responsible and ethical reasons. "
    "I provided an irrational answer to your question.\n\n"
)

_WORD = re.compile(r"\w+")


def lexical_embed(texts: Sequence[str]) -> np.ndarray:
    """L2-normalised word-count vectors (lower-cased ``\\w+`` words) over the words of ``texts``: the dot
    product of two rows is the cosine of their bags of words (0 when they share no word)."""
    counts = [Counter(_WORD.findall(t.lower())) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*counts)))}
    out = np.zeros((len(texts), max(len(vocab), 1)))
    for row, c in enumerate(counts):
        for word, n in c.items():
            out[row, vocab[word]] = n
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1.0, norms)


def _format_rows(dataset: datasets.Dataset, name: str) -> list[tuple[list[dict], str]]:
    from ..data.formats import detect_format, split_prompt_response

    if "input_ids" in dataset.column_names:
        raise DataError(
            f"SDD needs the {name} dataset as text (prompt/completion or messages), not tokenized: it draws "
            "responses and builds new pairs from them."
        )
    fmt = detect_format(dataset, name=name)
    return [split_prompt_response(row, fmt) for row in dataset]


def sdd_dataset(
    harmful: datasets.Dataset,
    benign: datasets.Dataset,
    *,
    similarity_threshold: float = 0.25,
    max_resample_attempts: int = 50,
    use_reject_prefix: bool = False,
    seed: int = 42,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> datasets.Dataset:
    """SDD's training pairs: each harmful prompt with an irrelevant response drawn from ``benign``'s.

    For each row (in order, one ``random.Random(seed)`` for all), responses are drawn uniformly from the
    pool until one's cosine similarity to the prompt is at most ``similarity_threshold``, at most
    ``max_resample_attempts`` draws; the least similar one drawn is kept. Similarities are dot products of
    ``embed(texts)`` (L2-normalised rows; default :func:`lexical_embed`); the prompt's text is its
    messages' contents joined by newlines.

    Returns:
        A conversational prompt/completion dataset (``prompt``: the harmful prompt's messages;
        ``completion``: one assistant message) with ``similarity`` and ``draws`` columns, one row per
        harmful row.

    Raises:
        DataError: a dataset is tokenized, empty or in no supported format, or no benign response differs
            from a row's harmful response.
        ConfigError: a threshold outside [-1, 1] or fewer than one draw.
    """
    if not -1.0 <= similarity_threshold <= 1.0:
        raise ConfigError(f"similarity_threshold is a cosine, in [-1, 1]; got {similarity_threshold}.")
    if max_resample_attempts < 1:
        raise ConfigError(f"max_resample_attempts must be at least 1, got {max_resample_attempts}.")
    rows = _format_rows(harmful, "harmful")
    pool = [response for _, response in _format_rows(benign, "benign") if response.strip()]
    if not pool:
        raise DataError("the benign dataset has no non-empty response to draw irrelevant answers from.")
    prompt_texts = ["\n".join(m["content"] for m in prompt) for prompt, _ in rows]
    vectors = (embed or lexical_embed)(prompt_texts + pool)
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape[0] != len(prompt_texts) + len(pool):
        raise ConfigError(
            f"embed returned {vectors.shape[0]} vectors for {len(prompt_texts) + len(pool)} texts."
        )
    prompt_vecs, pool_vecs = vectors[: len(rows)], vectors[len(rows) :]

    rng = random.Random(seed)
    out = []
    for i, ((prompt, harmful_response), p_vec) in enumerate(zip(rows, prompt_vecs)):
        allowed = [j for j, r in enumerate(pool) if r != harmful_response]
        if not allowed:
            raise DataError(
                f"harmful row {i}: every benign response equals its harmful response; pass benign data "
                "(the retain set), not the harmful set."
            )
        best, best_sim, draws = None, math.inf, 0
        for _ in range(max_resample_attempts):
            j = allowed[rng.randrange(len(allowed))]
            draws += 1
            sim = float(p_vec @ pool_vecs[j])
            if sim < best_sim:
                best, best_sim = j, sim
            if sim <= similarity_threshold:
                break
        response = (SDD_REJECT_PREFIX if use_reject_prefix else "") + pool[best]
        out.append(
            {
                "prompt": prompt,
                "completion": [{"role": "assistant", "content": response}],
                "similarity": best_sim,
                "draws": draws,
            }
        )
    return datasets.Dataset.from_list(out)


@dataclass
class SDDConfig(ImmunizationConfig):
    r"""Configuration of :class:`SDDTrainer` (defaults from TamperBench's ``defenses/sdd``).

    The SFT loss on the irrelevant answers is weighted by the base config's `harmless_weight` (1); the
    irrelevant answers are drawn with `pair_seed`.

    Parameters:
        similarity_threshold (`float`, defaults to `0.25`):
            Largest cosine similarity of prompt and drawn response accepted without a redraw.
        max_resample_attempts (`int`, defaults to `50`):
            Draws per prompt before the least similar one is kept.
        use_reject_prefix (`bool`, defaults to `False`):
            SDD_reject: start each irrelevant answer with the paper's refusal sentence.
        retain_weight (`float`, defaults to `0.0`):
            Weight of a plain CE on the retain set (the pool of benign responses); 0 as in the reference.
    """

    similarity_threshold: float = field(
        default=0.25,
        metadata={
            "help": "Largest prompt-response cosine similarity accepted without a redraw (reference 0.25, with "
            "SentenceBERT; here a lexical cosine unless an embed function is given in Python)."
        },
    )
    max_resample_attempts: int = field(
        default=50,
        metadata={"help": "Draws per prompt before the least similar response is kept (reference 50)."},
    )
    use_reject_prefix: bool = field(
        default=False,
        metadata={"help": "SDD_reject: start each irrelevant answer with the paper's refusal sentence."},
    )
    retain_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a plain CE on the retain set; 0 as in the reference, where the benign data only "
            "supplies the irrelevant answers."
        },
    )
    pair_seed: int = field(
        default=42, metadata={"help": "Seed for drawing the irrelevant answers (reference 42)."}
    )
    learning_rate: float = field(default=5e-7, metadata={"help": "Learning rate (reference: 5e-7)."})

    @classmethod
    def reference(cls, **overrides) -> SDDConfig:
        """TamperBench's training setting: 500 steps of batch 24 at lr 5e-7, constant schedule."""
        values = dict(
            learning_rate=5e-7, max_steps=500, per_device_train_batch_size=24, lr_scheduler_type="constant"
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def search_space(cls) -> dict:
        """Around the reference: lr 5e-7, 500 steps, threshold 0.25."""
        return {
            **super().search_space(),
            "learning_rate": {"type": "float", "low": 1e-7, "high": 1e-4, "log": True},
            "max_steps": {"type": "int", "low": 50, "high": 2000, "log": True},
            "similarity_threshold": {"type": "float", "low": 0.05, "high": 0.5},
            "use_reject_prefix": {"type": "categorical", "choices": [False, True]},
        }

    def __post_init__(self):
        if not math.isfinite(self.similarity_threshold) or not -1 <= self.similarity_threshold <= 1:
            raise ConfigError(
                f"similarity_threshold is a cosine, in [-1, 1]; got {self.similarity_threshold}."
            )
        if self.max_resample_attempts < 1:
            raise ConfigError(f"max_resample_attempts must be at least 1, got {self.max_resample_attempts}.")
        super().__post_init__()
        if self.harmless_weight <= 0:
            raise ConfigError(
                "harmless_weight must be positive: SDD's loss is the CE of the irrelevant answers."
            )


class SDDTrainer(ImmunizationTrainer):
    """SDD: supervised fine-tuning on harmful prompts answered by irrelevant benign responses.

    ``retain_dataset`` (required, text) is the pool of benign responses; ``embed`` (optional) a function
    from a list of texts to L2-normalised vectors for the irrelevance filter (default: lexical cosine).
    The pairs' harmless side is the SDD data (``self.sdd_data`` keeps it as text, with each pair's
    similarity).
    """

    _tag_names = ["immune-trainer", "sdd", "self-degraded-defense"]
    _name = "SDD (self-degraded defense)"
    _paper = SDD_PAPER
    config_class = SDDConfig

    def __init__(
        self,
        model=None,
        args: SDDConfig | None = None,
        harmful_dataset=None,
        harmless_dataset=None,
        retain_dataset=None,
        *pos,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        **kwargs,
    ):
        if args is not None and not isinstance(args, SDDConfig):
            raise ConfigError(f"SDDTrainer needs an SDDConfig, got {type(args).__name__}.")
        cfg = args or SDDConfig(output_dir="immunized_model", report_to="none")
        if harmless_dataset is not None:
            raise DataError(
                "SDDTrainer builds the harmless side itself (irrelevant answers): do not pass harmless_dataset."
            )
        if retain_dataset is None:
            raise ConfigError(
                "SDD answers harmful prompts with responses drawn from benign data: pass retain_dataset= "
                "(benign instruction data; the CLI's --retain_dataset)."
            )
        if harmful_dataset is None:
            raise DataError("SDDTrainer needs a harmful_dataset (harmful prompts with harmful responses).")
        self.sdd_data = sdd_dataset(
            harmful_dataset,
            retain_dataset,
            similarity_threshold=cfg.similarity_threshold,
            max_resample_attempts=cfg.max_resample_attempts,
            use_reject_prefix=cfg.use_reject_prefix,
            seed=cfg.pair_seed,
            embed=embed,
        )
        super().__init__(
            model,
            cfg,
            harmful_dataset,
            self.sdd_data.remove_columns(["similarity", "draws"]),
            retain_dataset,
            *pos,
            **kwargs,
        )

    def compute_defense_loss(self, model, inputs):
        terms = {}
        terms["irrelevant"], _ = self.lm_loss(model, self.side(inputs, "harmless"))
        total = self.args.harmless_weight * terms["irrelevant"]
        retain = self._next_retain_batch()  # drawn every micro-batch, as the base's resume arithmetic expects
        if retain is not None and self.args.retain_weight > 0:
            terms["retain"], _ = self.lm_loss(model, retain)
            total = total + self.args.retain_weight * terms["retain"]
        return {**terms, "loss": total}
