"""Loading models and datasets from what a user types: paths, Hub ids, ``embedded`` and dataset SPECs.

A dataset SPEC is a local file (.json, .jsonl, .csv, .parquet), a folder written by
``Dataset.save_to_disk``, ``embedded:NAME[/SPLIT]`` (the embedded offline data), or a Hub id with an
optional split (``PKU-Alignment/BeaverTails:30k_test``). Models load as safetensors only, and
``trust_remote_code`` stays off unless the user turns it on.
"""

from __future__ import annotations

import sys
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


_DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _looks_like_path(spec: str) -> bool:
    """True when ``spec`` can only be a local path (not a Hub id such as ``org/name``)."""
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or "\\" in spec
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in _DATASET_SUFFIXES
    )


def load_dataset_spec(spec: str, split: str | None = None, *, seed: int = 0):
    """Load a dataset from a SPEC (see the module docstring). ``seed`` draws the embedded harmful splits
    (``embedded:harmful_qa/SPLIT``); a report records it as ``datasets["split_seed"]``.

    Raises:
        DataError: the file or folder does not exist, is empty, cannot be parsed, has an unsupported
            suffix, or the Hub dataset cannot be loaded.
    """
    import datasets

    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"a dataset SPEC must be a non-empty string, got {spec!r}.")
    if spec.startswith("embedded:"):
        from . import embedded

        name = spec[len("embedded:") :]
        name, _, sub = name.partition("/")
        return embedded.load_embedded(name, split=sub or None, seed=seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        try:
            return datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(
                f"folder {spec!r} is not a dataset written by Dataset.save_to_disk ({err}); give a "
                ".json, .jsonl, .csv or .parquet file, or a saved dataset folder."
            ) from None
    if path.is_file():
        builder = _DATASET_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"cannot read dataset file {spec!r}: use .json, .jsonl, .csv or .parquet.")
        if path.stat().st_size == 0:
            raise DataError(f"dataset file {spec!r} is empty; it needs at least one row.")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - any parse failure of a user's file is a data error
            cause = err.__cause__ or err.__context__ or err
            raise DataError(
                f"cannot read dataset file {spec!r} as {builder}: {type(cause).__name__}: "
                f"{str(cause)[:300] or 'no detail'}. Check the file is valid {builder} with one row per record."
            ) from None
    if _looks_like_path(spec):
        raise DataError(
            f"dataset file or folder {spec!r} does not exist; check the path (a dataset SPEC is a .json, "
            ".jsonl, .csv or .parquet file, a save_to_disk folder, embedded:NAME[/SPLIT] or a Hub id)."
        )
    if spec.count("/") == 1 or ":" in spec:
        hub_id, _, hub_split = spec.partition(":")
        try:
            return datasets.load_dataset(hub_id, split=hub_split or split or "train")
        except Exception as err:  # noqa: BLE001 - offline, unknown id, unknown split: all user-facing
            raise DataError(
                f"cannot load the Hub dataset {hub_id!r} (split {hub_split or split or 'train'!r}): "
                f"{type(err).__name__}: {str(err)[:300]}. Check the id and split, make the Hub reachable, "
                "or give a local file."
            ) from None
    raise DataError(f"dataset {spec!r} is neither a file, a folder, embedded:NAME, nor a Hub id.")


_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt")


def check_model_folder(path: str | Path) -> None:
    """Check that a local model folder can be loaded safely: it has ``config.json`` and safetensors weights.

    A folder holding only pickle weights (``pytorch_model.bin``, ``*.pt``...) is refused: unpickling
    can run arbitrary code, so immune_trainer never does it.

    Raises:
        ConfigError: no config.json, pickle-only weights, or no weights at all.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model folder {str(folder)!r} has no config.json; give the folder written by save_pretrained."
        )
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted({p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles:
        raise ConfigError(
            f"model folder {str(folder)!r} holds only pickle weights ({', '.join(pickles)}); immune_trainer "
            "loads safetensors only, because unpickling a file can run arbitrary code. If you trust the "
            "file, convert it once: load it with transformers and save_pretrained the model again "
            "(which writes model.safetensors)."
        )
    raise ConfigError(f"model folder {str(folder)!r} has no model.safetensors weights.")


def load_model_and_tokenizer(args: ModelArguments):
    """Load a causal LM (safetensors only) and its tokenizer; ``embedded`` prepares the offline default.

    Raises:
        ConfigError: the path does not exist, holds only pickle weights, needs custom code while
            ``trust_remote_code`` is off, or the model cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = args.model
    if source == "embedded":
        from .assets import prepare_model

        source = str(prepare_model())
    path = Path(source).expanduser()
    if path.is_dir():
        check_model_folder(path)
        source = str(path)
    elif path.exists() or _looks_like_path(source):
        raise ConfigError(
            f"cannot load model {source!r}: no such folder. Give the folder written by save_pretrained, "
            "a Hub id (org/name), or 'embedded'."
        )
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
        ) from None
    except ValueError as err:
        if "trust_remote_code" in str(err) and not args.trust_remote_code:
            raise ConfigError(
                f"model {args.model!r} needs custom code from its repository (config.json auto_map), and "
                "trust_remote_code is off, so none was run. Read the code first; if you trust it, pass "
                "--trust_remote_code (trust_remote_code=True)."
            ) from None
        raise ConfigError(f"cannot load model {args.model!r}: {err}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def parse_cli_args(dataclass_types, argv: list[str] | None, prog: str):
    """Parse ``argv`` (and ``--config file.yaml``) into the given dataclasses with trl's ``TrlParser``.

    Unknown command-line options end the program the argparse way (usage message, exit status 2).

    Raises:
        ConfigError: the ``--config`` file is missing, is not a YAML mapping, holds keys that no option
            has, or a value is rejected by a dataclass (``TrainingArguments`` included).
    """
    import yaml
    from trl import TrlParser

    from .errors import ImmuneTrainerError

    parser = TrlParser(dataclass_types, prog=prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs the path of a YAML file.")
        config_path = Path(argv[i + 1])
        if not config_path.is_file():
            raise ConfigError(f"config file {str(config_path)!r} does not exist; check the --config path.")
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(config_path)!r} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(config_path)!r} must hold a YAML mapping of option: value, "
                f"got {type(loaded).__name__}."
            )
    try:
        *parsed, from_file, from_argv = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ImmuneTrainerError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid options for {prog}: {err}") from None
    if from_argv:
        parser.error(f"unrecognized arguments: {' '.join(from_argv)}")
    if from_file:
        unknown = [k[2:] for k in from_file[::2]]
        raise ConfigError(
            f"config file {argv[argv.index('--config') + 1]!r} has unknown key(s) {unknown}; "
            f"see `{prog} --help` for the options."
        )
    return tuple(parsed)
