"""The field's standard datasets on the Hugging Face Hub, with their licenses and citations.

Real harmful data is never shipped with this package: :func:`load_hub_dataset` fetches the field's
standard sets from the Hugging Face Hub into the user's cache and converts them to prompt/completion.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from ..errors import ConfigError, DataError
from .pairing import _in_categories


@dataclass(frozen=True)
class HubDatasetSpec:
    """How to load one of the field's standard datasets and convert it to prompt/completion."""

    hub_id: str = field(
        metadata={"help": "Hub dataset id passed to datasets.load_dataset (or a source name)."}
    )
    description: str = field(default="", metadata={"help": "One line on what the set holds and who uses it."})
    config: str | None = field(
        default=None, metadata={"help": "Hub configuration name, if the set has several."}
    )
    splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train"},
        metadata={"help": "Our split names ('train', 'test') -> the dataset's own split names."},
    )
    column_map: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Source column -> canonical 'prompt' / 'completion' / 'category'."},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "str.format template over source columns building the prompt (e.g. Alpaca)."},
    )
    label_names: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "For classification sets: the completion text of each integer label."},
    )
    keep: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Keep only rows whose column equals the value (BeaverTails: is_safe == False)."},
    )
    category_column: str | None = field(
        default=None,
        metadata={"help": "Source column holding the harm category (a str, or a dict of name -> bool)."},
    )
    data_files: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Files to load instead of a Hub dataset repo (split or category -> file URL)."},
    )
    files_are_categories: bool = field(
        default=False,
        metadata={
            "help": "Each entry of data_files is one category (HEx-PHI): loaded and labelled one by one."
        },
    )
    load_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra keyword arguments for datasets.load_dataset."}
    )
    prompt_only: bool = field(
        default=False, metadata={"help": "The set has prompts but no responses (evaluation prompts)."}
    )
    gated: bool = field(
        default=False, metadata={"help": "Access must be requested on the Hub and a token used."}
    )
    license: str = field(
        default="unknown", metadata={"help": "The dataset's license as stated by its authors."}
    )
    citation: str = field(default="", metadata={"help": "BibTeX of the paper introducing the dataset."})
    url: str = field(default="", metadata={"help": "Where to read about the dataset."})


_BEAVERTAILS_CITATION = """@inproceedings{ji2023beavertails,
  title={BeaverTails: Towards Improved Safety Alignment of LLM via a Human-Preference Dataset},
  author={Ji, Jiaming and Liu, Mickel and Dai, Juntao and Pan, Xuehai and Zhang, Chi and Bian, Ce and Chen, Boyuan and Sun, Ruiyang and Wang, Yizhou and Yang, Yaodong},
  booktitle={Advances in Neural Information Processing Systems},
  year={2023}
}"""

_REPNOISE_CITATION = """@inproceedings{rosati2024representation,
  title={Representation Noising: A Defence Mechanism Against Harmful Finetuning},
  author={Rosati, Domenic and Wehner, Jan and Williams, Kai and Bartoszcze, {\\L}ukasz and Gonzales, Robie and Maple, Carsten and Majumdar, Subhabrata and Sajjad, Hassan and Rudzicz, Frank},
  booktitle={Advances in Neural Information Processing Systems},
  year={2024}
}"""

_HEXPHI_CATEGORIES = {
    "illegal_activity": 1,
    "hate_harass_violence": 3,
    "malware": 4,
    "physical_harm": 5,
    "economic_harm": 6,
    "fraud_deception": 7,
    "adult_content": 8,
    "political_campaigning": 9,
    "privacy_violation": 10,
    "tailored_financial_advice": 11,
}

HARMFUL_DATASETS: dict[str, HubDatasetSpec] = {
    "beavertails": HubDatasetSpec(
        hub_id="PKU-Alignment/BeaverTails",
        description="Human-labelled QA pairs over 14 harm categories; harmful rows (is_safe == False) only.",
        splits={"train": "30k_train", "test": "30k_test"},
        column_map={"prompt": "prompt", "response": "completion"},
        keep={"is_safe": False},
        category_column="category",
        license="cc-by-nc-4.0",
        citation=_BEAVERTAILS_CITATION,
        url="https://huggingface.co/datasets/PKU-Alignment/BeaverTails",
    ),
    "beavertails_refusals": HubDatasetSpec(
        hub_id="domenicrosati/representation-noising",
        description=(
            "RepNoise's BeaverTails train set with a refusal per row (column 'refusal', kept for build_pairs"
            "(refusal_column='refusal')); harmful rows only. Fetched from the RepNoise GitHub repository."
        ),
        data_files={
            "train": "https://raw.githubusercontent.com/domenicrosati/representation-noising/main/"
            "data/beavertails_with_refusals_train.json"
        },
        column_map={"prompt": "prompt", "response": "completion", "refusal": "refusal"},
        keep={"is_safe": False},
        category_column="category",
        license="cc-by-nc-4.0 (BeaverTails); refusals from the RepNoise repository",
        citation=_REPNOISE_CITATION + "\n" + _BEAVERTAILS_CITATION,
        url="https://github.com/domenicrosati/representation-noising",
    ),
    "advbench": HubDatasetSpec(
        hub_id="walledai/AdvBench",
        description="520 harmful behaviours with an affirmative target ('Sure, here is ...') as completion.",
        column_map={"prompt": "prompt", "target": "completion"},
        license="mit",
        citation="""@article{zou2023universal,
  title={Universal and Transferable Adversarial Attacks on Aligned Language Models},
  author={Zou, Andy and Wang, Zifan and Kolter, J. Zico and Fredrikson, Matt},
  journal={arXiv preprint arXiv:2307.15043},
  year={2023}
}""",
        url="https://huggingface.co/datasets/walledai/AdvBench",
    ),
    "harmbench": HubDatasetSpec(
        hub_id="walledai/HarmBench",
        config="standard",
        description="HarmBench standard behaviours (prompts only) with semantic categories.",
        column_map={"prompt": "prompt"},
        category_column="category",
        prompt_only=True,
        license="mit",
        citation="""@article{mazeika2024harmbench,
  title={HarmBench: A Standardized Evaluation Framework for Automated Red Teaming and Robust Refusal},
  author={Mazeika, Mantas and Phan, Long and Yin, Xuwang and Zou, Andy and Wang, Zifan and Mu, Norman and Sakhaee, Elham and Li, Nathaniel and Basart, Steven and Li, Bo and Forsyth, David and Hendrycks, Dan},
  journal={arXiv preprint arXiv:2402.04249},
  year={2024}
}""",
        url="https://huggingface.co/datasets/walledai/HarmBench",
    ),
    "hex_phi": HubDatasetSpec(
        hub_id="LLM-Tuning-Safety/HEx-PHI",
        description="HEx-PHI harmful instructions (prompts only), one CSV per category; gated on the Hub.",
        data_files={
            name: f"hf://datasets/LLM-Tuning-Safety/HEx-PHI/category_{number}.csv"
            for name, number in _HEXPHI_CATEGORIES.items()
        },
        files_are_categories=True,
        load_kwargs={"column_names": ["prompt"]},
        prompt_only=True,
        gated=True,
        license="HEx-PHI terms of use (research only; accept on the Hub)",
        citation="""@inproceedings{qi2024finetuning,
  title={Fine-tuning Aligned Language Models Compromises Safety, Even When Users Do Not Intend To!},
  author={Qi, Xiangyu and Zeng, Yi and Xie, Tinghao and Chen, Pin-Yu and Jia, Ruoxi and Mittal, Prateek and Henderson, Peter},
  booktitle={International Conference on Learning Representations},
  year={2024}
}""",
        url="https://huggingface.co/datasets/LLM-Tuning-Safety/HEx-PHI",
    ),
    "do_not_answer": HubDatasetSpec(
        hub_id="LibrAI/do-not-answer",
        description="939 prompts a responsible model should not answer (prompts only), by risk area.",
        column_map={"question": "prompt"},
        category_column="risk_area",
        prompt_only=True,
        license="apache-2.0",
        citation="""@article{wang2023donotanswer,
  title={Do-Not-Answer: A Dataset for Evaluating Safeguards in LLMs},
  author={Wang, Yuxia and Li, Haonan and Han, Xudong and Nakov, Preslav and Baldwin, Timothy},
  journal={arXiv preprint arXiv:2308.13387},
  year={2023}
}""",
        url="https://huggingface.co/datasets/LibrAI/do-not-answer",
    ),
}

BENIGN_DATASETS: dict[str, HubDatasetSpec] = {
    "xstest": HubDatasetSpec(
        hub_id="Paul/XSTest",
        description="XSTest's 250 safe prompts that look unsafe (its 200 unsafe contrast prompts dropped), "
        "for the over-refusal check of helpfulness; the embedded default is embedded:benign_requests.",
        column_map={"prompt": "prompt"},
        category_column="type",
        keep={"label": "safe"},
        prompt_only=True,
        license="cc-by-4.0",
        citation="""@inproceedings{rottger2024xstest,
  title={XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours in Large Language Models},
  author={R{\\"o}ttger, Paul and Kirk, Hannah Rose and Vidgen, Bertie and Attanasio, Giuseppe and Bianchi, Federico and Hovy, Dirk},
  booktitle={NAACL},
  year={2024}
}""",
        url="https://huggingface.co/datasets/Paul/XSTest",
    ),
    "alpaca": HubDatasetSpec(
        hub_id="tatsu-lab/alpaca",
        description="52k instruction-following demonstrations (retain / trainability data).",
        prompt_template="{instruction}\n\n{input}",
        column_map={"output": "completion"},
        license="cc-by-nc-4.0",
        citation="""@misc{alpaca,
  title={Stanford Alpaca: An Instruction-following LLaMA model},
  author={Taori, Rohan and Gulrajani, Ishaan and Zhang, Tianyi and Dubois, Yann and Li, Xuechen and Guestrin, Carlos and Liang, Percy and Hashimoto, Tatsunori B.},
  year={2023},
  howpublished={\\url{https://github.com/tatsu-lab/stanford_alpaca}}
}""",
        url="https://huggingface.co/datasets/tatsu-lab/alpaca",
    ),
    "sst2": HubDatasetSpec(
        hub_id="stanfordnlp/sst2",
        description="SST-2 sentiment as prompt/completion ('positive' / 'negative') for trainability.",
        splits={"train": "train", "test": "validation"},
        prompt_template="Is the sentiment of this sentence positive or negative?\n\n{sentence}",
        column_map={"label": "completion"},
        label_names=("negative", "positive"),
        license="unknown",
        citation="""@inproceedings{socher2013recursive,
  title={Recursive Deep Models for Semantic Compositionality Over a Sentiment Treebank},
  author={Socher, Richard and Perelygin, Alex and Wu, Jean and Chuang, Jason and Manning, Christopher D. and Ng, Andrew and Potts, Christopher},
  booktitle={EMNLP},
  year={2013}
}""",
        url="https://huggingface.co/datasets/stanfordnlp/sst2",
    ),
    "ag_news": HubDatasetSpec(
        hub_id="fancyzhx/ag_news",
        description="AG News topic classification as prompt/completion for trainability.",
        splits={"train": "train", "test": "test"},
        prompt_template="Which topic is this news article about: World, Sports, Business or Sci/Tech?\n\n{text}",
        column_map={"label": "completion"},
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        license="unknown",
        citation="""@inproceedings{zhang2015character,
  title={Character-level Convolutional Networks for Text Classification},
  author={Zhang, Xiang and Zhao, Junbo and LeCun, Yann},
  booktitle={NeurIPS},
  year={2015}
}""",
        url="https://huggingface.co/datasets/fancyzhx/ag_news",
    ),
    "gsm8k": HubDatasetSpec(
        hub_id="openai/gsm8k",
        config="main",
        description="Grade-school maths word problems with worked answers, for trainability.",
        splits={"train": "train", "test": "test"},
        column_map={"question": "prompt", "answer": "completion"},
        license="mit",
        citation="""@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and Kosaraju, Vineet and Bavarian, Mohammad and Chen, Mark and Jun, Heewoo and Kaiser, Lukasz and Plappert, Matthias and Tworek, Jerry and Hilton, Jacob and Nakano, Reiichiro and Hesse, Christopher and Schulman, John},
  journal={arXiv preprint arXiv:2110.14168},
  year={2021}
}""",
        url="https://huggingface.co/datasets/openai/gsm8k",
    ),
}


def _category_value(value: Any) -> Any:
    """BeaverTails stores categories as {name: bool}; turn that into the sorted list of true names."""
    if isinstance(value, Mapping):
        return sorted(k for k, v in value.items() if v)
    return value


def _convert_row(spec: HubDatasetSpec) -> Callable[[dict], dict]:
    def convert(row: dict) -> dict:
        out: dict[str, Any] = {}
        for src, dst in spec.column_map.items():
            out[dst] = row[src]
        if spec.prompt_template is not None:
            out["prompt"] = spec.prompt_template.format(**row).strip()
        if spec.label_names is not None and "completion" in out:
            out["completion"] = spec.label_names[int(out["completion"])]
        if spec.category_column is not None:
            out["category"] = _category_value(row[spec.category_column])
        return out

    return convert


def load_hub_dataset(
    name: str,
    split: str = "train",
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Load one of :data:`HARMFUL_DATASETS` or :data:`BENIGN_DATASETS` from the Hub as prompt/completion.

    Args:
        name: a key of either registry.
        split: one of the spec's split names ('train', 'test') or a split name of the dataset itself.
        categories: keep only rows whose category (any of a multi-label row's) is listed.
        limit: keep the first ``limit`` rows after filtering.
        cache_dir: where datasets caches the download (default: the user's HF cache).

    Returns:
        A dataset with ``prompt`` and ``completion`` (str; no ``completion`` for prompt-only sets), a
        ``category`` column where the set has one (a str, or a list of str for BeaverTails), and any
        extra columns the spec maps (BeaverTails refusals: ``refusal``).

    Raises:
        ConfigError: unknown name (the known ones are listed) or split, or categories on a set without any.
        DataError: no row is left after filtering.
    """
    registry = {**HARMFUL_DATASETS, **BENIGN_DATASETS}
    if name not in registry:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {sorted(registry)}.")
    spec = registry[name]
    if categories is not None and spec.category_column is None and not spec.files_are_categories:
        raise ConfigError(
            f"dataset {name!r} has no categories, so categories={list(categories)} cannot apply."
        )

    if spec.files_are_categories:
        files = spec.data_files or {}
        wanted = list(files) if categories is None else list(categories)
        unknown = [c for c in wanted if c not in files]
        if unknown:
            raise ConfigError(f"dataset {name!r} has no categories {unknown}; it has {sorted(files)}.")
        parts = []
        for category in wanted:
            part = datasets.load_dataset(
                "csv",
                data_files={"train": files[category]},
                split="train",
                cache_dir=cache_dir,
                **spec.load_kwargs,
            )
            parts.append(part.add_column("category", [category] * len(part)))
        raw = datasets.concatenate_datasets(parts)
        raw = raw.select_columns(["prompt", "category"])
    else:
        source_split = spec.splits.get(split, split)
        if spec.data_files is not None:
            if split not in spec.data_files:
                raise ConfigError(f"dataset {name!r} has splits {sorted(spec.data_files)}, not {split!r}.")
            path = spec.data_files[split]
            builder = "json" if str(path).endswith((".json", ".jsonl")) else "csv"
            raw = datasets.load_dataset(
                builder, data_files={split: path}, split=split, cache_dir=cache_dir, **spec.load_kwargs
            )
        else:
            raw = datasets.load_dataset(
                spec.hub_id, spec.config, split=source_split, cache_dir=cache_dir, **spec.load_kwargs
            )
        for column, value in spec.keep.items():
            raw = raw.filter(lambda row, c=column, v=value: row[c] == v, desc=f"Keeping {column} == {value}")
        raw = raw.map(_convert_row(spec), remove_columns=raw.column_names, desc=f"Converting {name}")
        if categories is not None:
            wanted_set = set(categories)
            raw = raw.filter(
                lambda row: _in_categories(row["category"], wanted_set), desc="Selecting categories"
            )
    if len(raw) == 0:
        raise DataError(
            f"no rows of {name!r} (split {split!r}) are left after filtering"
            + (f" to categories {list(categories)}" if categories is not None else "")
            + "."
        )
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    return raw
