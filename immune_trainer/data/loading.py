"""Loading models and datasets from what a user types: paths, Hub ids, ``embedded`` and dataset SPECs.

A dataset SPEC is a local file (.json, .jsonl, .csv, .parquet), a folder written by
``Dataset.save_to_disk``, ``embedded:NAME[/SPLIT]`` (the embedded offline data), or a Hub id with an
optional split (``PKU-Alignment/BeaverTails:30k_test``), or ``hub:NAME[/SPLIT]``: a registered Hub set
(:data:`~immune_trainer.data.hub_datasets.HARMFUL_DATASETS`, ``BENIGN_DATASETS``) loaded by
:func:`~immune_trainer.data.hub_datasets.load_hub_dataset`, converted to prompt/completion and filtered
(``hub:beavertails/test``: BeaverTails' harmful rows only). Models load as safetensors only, and
``trust_remote_code`` stays off unless the user turns it on.

Everything a user typed is checked before anything is loaded (:func:`validate_sources`): the SPECs'
syntax, that embedded names and splits exist, that local files and folders exist. A Hub id is fetched
only after a short check that the Hub answers (:func:`check_hub_access`): without it, or with
``HF_HUB_OFFLINE`` set and the id not cached, the error is one line naming the id, not a minute of
retries.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

HUB_CHECK_TIMEOUT = 5.0
"""Seconds the Hub may take to answer the reachability check before a Hub id is given up."""


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

LM_EVAL_PREFIX = "lm_eval:"
"""A SPEC that names lm-evaluation-harness tasks (a reference set, parsed by the scoring layer)."""


def _looks_like_path(spec: str) -> bool:
    """True when ``spec`` can only be a local path (not a Hub id such as ``org/name``)."""
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or "\\" in spec
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in _DATASET_SUFFIXES
    )


HUB_REGISTRY_PREFIX = "hub:"
"""A SPEC ``hub:NAME[/SPLIT]`` names a registered Hub dataset (converted and filtered, see the docstring)."""


def _registered_hub_spec(spec: str):
    """``(name, split, its HubDatasetSpec)`` of a ``hub:NAME[/SPLIT]`` SPEC; ConfigError when unknown."""
    from .hub_datasets import BENIGN_DATASETS, HARMFUL_DATASETS

    registry = {**HARMFUL_DATASETS, **BENIGN_DATASETS}
    name, _, split = spec[len(HUB_REGISTRY_PREFIX) :].partition("/")
    if name not in registry:
        raise ConfigError(
            f"dataset {spec!r}: unknown registered Hub dataset {name!r}; choose one of {sorted(registry)} "
            "(or give the Hub id itself, unconverted)."
        )
    entry = registry[name]
    known = set(entry.splits) | set(entry.data_files or {})
    if split and entry.data_files is not None and split not in entry.data_files:
        raise ConfigError(f"dataset {spec!r}: {name!r} has splits {sorted(known)}, not {split!r}.")
    return name, split or "train", entry


def check_dataset_spec(spec: str) -> str:
    """Check a dataset SPEC without reading any data or touching the network.

    Returns:
        Its kind: ``"embedded"``, ``"folder"``, ``"file"``, ``"hub"``, ``"registered"`` (``hub:NAME``) or
        ``"lm_eval"`` (a reference set
        that names lm-evaluation-harness tasks; see :class:`immune_trainer.scoring.LMEvalTasks`).

    Raises:
        DataError: empty SPEC, a missing, empty or unsupported local file, or a malformed Hub id.
        ConfigError: an unknown embedded dataset or split.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"a dataset SPEC must be a non-empty string, got {spec!r}.")
    if spec.startswith(LM_EVAL_PREFIX):
        if not spec[len(LM_EVAL_PREFIX) :].partition("?")[0].strip(","):
            raise DataError(f"{spec!r} names no task; write lm_eval:TASK[,TASK...] (e.g. lm_eval:mmlu).")
        return "lm_eval"
    if spec.startswith(HUB_REGISTRY_PREFIX):
        _registered_hub_spec(spec)
        return "registered"
    if spec.startswith("embedded:"):
        from .embedded import EMBEDDED_DATASETS

        name, _, sub = spec[len("embedded:") :].partition("/")
        card = EMBEDDED_DATASETS.get(name)
        if card is None:
            raise ConfigError(f"unknown embedded dataset {name!r}; choose one of {sorted(EMBEDDED_DATASETS)}")
        if sub and sub not in card.splits:
            allowed = ", ".join(card.splits) if card.splits else f"none (write embedded:{name})"
            raise ConfigError(f"embedded dataset {name!r} has no split {sub!r}; splits: {allowed}")
        return "embedded"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.suffix.lower() not in _DATASET_SUFFIXES:
            raise DataError(f"cannot read dataset file {spec!r}: use .json, .jsonl, .csv or .parquet.")
        if path.stat().st_size == 0:
            raise DataError(f"dataset file {spec!r} is empty; it needs at least one row.")
        return "file"
    if _looks_like_path(spec):
        raise DataError(
            f"dataset file or folder {spec!r} does not exist; check the path (a dataset SPEC is a .json, "
            ".jsonl, .csv or .parquet file, a save_to_disk folder, embedded:NAME[/SPLIT] or a Hub id)."
        )
    if spec.count("/") == 1 or ":" in spec:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        hub_id = spec.partition(":")[0]
        try:
            validate_repo_id(hub_id)
        except HFValidationError as err:
            raise DataError(f"dataset {spec!r}: {hub_id!r} is not a valid Hub id ({err}).") from None
        return "hub"
    raise DataError(f"dataset {spec!r} is neither a file, a folder, embedded:NAME, nor a Hub id.")


def load_dataset_spec(spec: str, split: str | None = None, *, seed: int = 0):
    """Load a dataset from a SPEC (see the module docstring). ``seed`` draws the embedded harmful splits
    (``embedded:harmful_qa/SPLIT``); a report records it as ``datasets["split_seed"]``.

    Raises:
        DataError: the file or folder does not exist, is empty, cannot be parsed, has an unsupported
            suffix, or the Hub dataset cannot be loaded.
        ConfigError: an unknown embedded dataset or split, or the Hub is unreachable (one line).
    """
    import datasets

    kind = check_dataset_spec(spec)
    if kind == "lm_eval":
        raise DataError(
            f"{spec!r} names lm-evaluation-harness tasks, not a dataset: only a stability reference set "
            "(--reference) takes it."
        )
    if kind == "registered":
        from .hub_datasets import load_hub_dataset

        name, hub_split, entry = _registered_hub_spec(spec)
        if entry.data_files is None:
            check_hub_access(entry.hub_id, what="dataset", repo_type="dataset")
        return load_hub_dataset(name, split=hub_split)
    if kind == "embedded":
        from . import embedded

        name, _, sub = spec[len("embedded:") :].partition("/")
        return embedded.load_embedded(name, split=sub or None, seed=seed)
    path = Path(spec).expanduser()
    if kind == "folder":
        try:
            return datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(
                f"folder {spec!r} is not a dataset written by Dataset.save_to_disk ({err}); give a "
                ".json, .jsonl, .csv or .parquet file, or a saved dataset folder."
            ) from None
    if kind == "file":
        builder = _DATASET_SUFFIXES[path.suffix.lower()]
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - any parse failure of a user's file is a data error
            cause = err.__cause__ or err.__context__ or err
            raise DataError(
                f"cannot read dataset file {spec!r} as {builder}: {type(cause).__name__}: "
                f"{str(cause)[:300] or 'no detail'}. Check the file is valid {builder} with one row per record."
            ) from None
    hub_id, _, hub_split = spec.partition(":")
    check_hub_access(hub_id, what="dataset", repo_type="dataset")
    try:
        return datasets.load_dataset(hub_id, split=hub_split or split or "train")
    except Exception as err:  # noqa: BLE001 - offline, unknown id, unknown split: all user-facing
        raise DataError(
            f"cannot load the Hub dataset {hub_id!r} (split {hub_split or split or 'train'!r}): "
            f"{type(err).__name__}: {str(err)[:300]}. Check the id and split, make the Hub reachable, "
            "or give a local file."
        ) from None


def check_model_source(source: str, what: str = "model") -> str:
    """Check a model (or tokenizer) argument without loading it or touching the network.

    Returns:
        Its kind: ``"embedded"``, ``"folder"`` or ``"hub"``.

    Raises:
        ConfigError: a local path that does not exist or is not a loadable model folder, or a malformed Hub id.
    """
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{what} must be a path, a Hub id or 'embedded', got {source!r}.")
    if source == "embedded":
        return "embedded"
    path = Path(source).expanduser()
    if path.is_dir():
        if what == "model":
            check_model_folder(path)
        return "folder"
    if path.exists() or _looks_like_path(source):
        raise ConfigError(
            f"cannot load {what} {source!r}: no such folder. Give the folder written by save_pretrained, "
            "a Hub id (org/name), or 'embedded'."
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as err:
        raise ConfigError(
            f"cannot load {what} {source!r}: it is neither a local folder nor a valid Hub id ({err})."
        ) from None
    return "hub"


def validate_sources(models=(), datasets=()) -> None:
    """Check every model and dataset argument of a command before anything is loaded.

    ``models`` and ``datasets`` are iterables of strings; ``None`` entries are skipped. All local checks
    run first (so a typo in the last argument is reported before a model is fetched), then one
    :func:`check_hub_access` per Hub id.

    Raises:
        ConfigError, DataError: the first bad argument, named.
    """
    hub = []
    for source in models:
        if source is not None and check_model_source(source) == "hub":
            hub.append((source, "model", "model"))
    for spec in datasets:
        kind = None if spec is None else check_dataset_spec(spec)
        if kind == "hub":
            hub.append((spec.partition(":")[0], "dataset", "dataset"))
        elif kind == "registered":
            entry = _registered_hub_spec(spec)[2]
            if entry.data_files is None:  # a set fetched from a URL is not on the Hub
                hub.append((entry.hub_id, "dataset", "dataset"))
    for repo_id, what, repo_type in hub:
        check_hub_access(repo_id, what=what, repo_type=repo_type)


_TRUE = {"1", "ON", "YES", "TRUE"}
_probe_cache: dict[str, tuple[float, str | None]] = {}


def _offline() -> bool:
    import huggingface_hub

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return huggingface_hub.is_offline_mode() or any(os.environ.get(n, "").upper() in _TRUE for n in names)


def _hub_unreachable_reason(endpoint: str, timeout: float = HUB_CHECK_TIMEOUT) -> str | None:
    """Why the Hub at ``endpoint`` did not answer one HEAD request (no retries), or None when it did.

    Any HTTP answer counts as reachable; the result is reused for a minute."""
    from huggingface_hub.utils import get_session

    hit = _probe_cache.get(endpoint)
    if hit is not None and time.monotonic() - hit[0] < 60:
        return hit[1]
    try:
        get_session().head(endpoint, timeout=timeout)  # huggingface_hub's own HTTP client and proxies
        reason = None
    except Exception as err:  # noqa: BLE001 - no answer, whatever the cause, is "unreachable"
        reason = (str(err).splitlines() or [""])[0][:200] or type(err).__name__
    _probe_cache[endpoint] = (time.monotonic(), reason)
    return reason


def _model_in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed cache is the same as no cache
        return False


def check_hub_access(repo_id: str, *, what: str = "model", repo_type: str = "model") -> bool:
    """Make sure ``repo_id`` can come from the Hub before anything is fetched; fail fast when it cannot.

    Returns:
        True when the files must be read from the local Hugging Face cache only (offline mode, or the
        Hub is unreachable and the model is cached), False when the Hub answered.

    Raises:
        ConfigError (one line, naming the id): offline mode is on and the model is not cached, or the
            Hub did not answer within :data:`HUB_CHECK_TIMEOUT` seconds and it is not cached.
    """
    from huggingface_hub import constants

    cached = repo_type == "model" and _model_in_cache(repo_id)
    if _offline():
        if cached or repo_type != "model":  # datasets reads its own cache in offline mode, at once
            return True
        raise ConfigError(
            f"{what} {repo_id!r} is not a local folder and not in the Hugging Face cache, and offline mode "
            "is on (HF_HUB_OFFLINE): give a local folder, or unset HF_HUB_OFFLINE so it can be downloaded."
        )
    endpoint = constants.ENDPOINT
    reason = _hub_unreachable_reason(endpoint)
    if reason is None:
        return False
    if cached:
        logger.warning(
            "the Hub (%s) is unreachable (%s): using the cached copy of %s", endpoint, reason, repo_id
        )
        return True
    raise ConfigError(
        f"cannot reach the Hugging Face Hub at {endpoint} ({reason}) to fetch the {what} {repo_id!r}: give "
        "a local path, check the connection or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache."
    )


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
    kind = check_model_source(source)
    tokenizer_kind = check_model_source(args.tokenizer, what="tokenizer") if args.tokenizer else None
    # True: the Hub is unreachable or offline mode is on, and the files are in the local cache.
    model_local_only = kind == "hub" and check_hub_access(source, what="model")
    tokenizer_local_only = (
        tokenizer_kind == "hub" and check_hub_access(args.tokenizer, what="tokenizer")
        if args.tokenizer
        else model_local_only
    )
    if kind == "embedded":
        from .assets import prepare_model

        source = str(prepare_model())
    elif kind == "folder":
        source = str(Path(source).expanduser())
    tokenizer_source = args.tokenizer or source
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            trust_remote_code=args.trust_remote_code,
            use_safetensors=True,
            local_files_only=model_local_only,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source,
            trust_remote_code=args.trust_remote_code,
            local_files_only=tokenizer_local_only,
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

    from ..errors import ImmuneTrainerError

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
