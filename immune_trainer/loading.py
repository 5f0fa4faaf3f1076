"""Loading models and datasets from what a user types: paths, Hub ids, ``embedded`` and dataset SPECs.

A dataset SPEC is a local file (.json, .jsonl, .csv, .parquet), a folder written by
``Dataset.save_to_disk``, ``embedded:NAME[/SPLIT]`` (the embedded offline data), or a Hub id with an
optional split (``PKU-Alignment/BeaverTails:30k_test``). Models load as safetensors only, and
``trust_remote_code`` stays off unless the user turns it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, DataError


@dataclass
class ModelArguments:
    """Which model to load (by path, Hub id, or ``embedded`` for the embedded default model)."""

    model: str = field(default="embedded", metadata={"help": "Model path, Hub id, or 'embedded'."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer path or id (default: the model's)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the repository (off unless you trust it)."}
    )


def load_dataset_spec(spec: str, split: str | None = None):
    """Load a dataset from a SPEC (see the module docstring)."""
    import datasets

    if spec.startswith("embedded:"):
        from . import embedded

        name = spec[len("embedded:") :]
        name, _, sub = name.partition("/")
        return embedded.load_embedded(name, split=sub or None)
    path = Path(spec)
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if path.is_file():
        suffix = path.suffix.lower()
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
        if builder is None:
            raise DataError(f"cannot read dataset file {spec!r}: use .json, .jsonl, .csv or .parquet.")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if spec.count("/") == 1 or ":" in spec:
        hub_id, _, hub_split = spec.partition(":")
        return datasets.load_dataset(hub_id, split=hub_split or split or "train")
    raise DataError(f"dataset {spec!r} is neither a file, a folder, embedded:NAME, nor a Hub id.")


def load_model_and_tokenizer(args: ModelArguments):
    """Load a causal LM (safetensors only) and its tokenizer; ``embedded`` prepares the offline default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = args.model
    if source == "embedded":
        from .assets import prepare_model

        source = str(prepare_model())
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, trust_remote_code=args.trust_remote_code, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer or source, trust_remote_code=args.trust_remote_code
        )
    except OSError as err:
        raise ConfigError(
            f"cannot load model {args.model!r} as safetensors: {err}. Give a local folder with "
            "model.safetensors, or a Hub id when the Hub is reachable."
        ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
