"""Hugging Face Hub ids as users type them: ``model=org/name`` and ``data.train=hf://org/dataset[:split]``.

Both go through the standard Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``), so a model or data set fetched once by ``huggingface-cli download`` (``hf
download``), by transformers or by datasets is found again without a network:

* offline (``HF_HUB_OFFLINE=1``, which the ``tuneforge`` command sets unless told otherwise) an id resolves
  from the cache only; one that is not there fails with one line saying how to fetch it;
* online (``HF_HUB_OFFLINE=0``) a model is downloaded into the cache (config, weights in safetensors when
  the repo has them, tokenizer files; not TF/Flax/ONNX copies) and a data set through ``datasets``.

A model resolves to its cached snapshot folder (``models--org--name/snapshots/<commit>/``, the commit named
by ``refs/main``), which the rest of tuneforge treats like any local Hugging Face folder. A data set is read
from its cached snapshot with ``datasets.load_dataset(folder)`` (the card's ``configs`` and the file-name
split conventions apply), else through ``datasets``' own cache of a data set loaded online before, and
becomes a `Table` whose "line" numbers are 1-based row numbers.

Online downloads are the libraries' own code paths and are not exercised by the tests (the test machine
has no network); the offline paths are, against a cache laid out as the Hub writes it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError, DataError

__all__ = ["HF_SCHEME", "HubModel", "cached_models", "hub_cache_dir", "hub_offline", "is_hub_id", "parse_hf_uri",
           "read_hub_dataset", "resolve_hub_model"]

HF_SCHEME = re.compile(r"^hf:/+")  # pydantic's Path folds "hf://" into "hf:/"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(text: str) -> bool:
    """``org/name`` shaped (one slash, Hub-legal characters)."""
    return bool(_HUB_ID.match(text))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    """The Hub cache as set now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _datasets_cache() -> Path:
    """``datasets``' own cache as set now (``HF_DATASETS_CACHE``, else beside the Hub cache's ``HF_HOME``)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "datasets"


def _fetch_hint(repo_id: str, dataset: bool = False) -> str:
    kind = "--repo-type dataset " if dataset else ""
    hint = (f"fetch it with `huggingface-cli download {kind}{repo_id}` (or `hf download {kind}{repo_id}`) where there "
            "is network access into this cache")
    return hint + (", or set HF_HUB_OFFLINE=0 to let tuneforge download it" if hub_offline() else "")


def resolve_hub_model(repo_id: str, key: str = "model") -> Path:
    """The cached snapshot folder of Hub model ``repo_id`` (downloaded first when online); `ConfigError` at
    ``key`` with the fetch command when it is not cached offline, unknown on the Hub, or not a model."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache, offline = hub_cache_dir(), hub_offline()
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=offline,
                                        allow_patterns=None if offline else _model_patterns(repo_id)))
    except LocalEntryNotFoundError:
        if offline:
            raise ConfigError(f"'{repo_id}' is neither a local folder nor a model in the Hugging Face cache "
                              f"({cache}), and HF_HUB_OFFLINE=1: {_fetch_hint(repo_id)}", key=key) from None
        raise ConfigError(f"could not download '{repo_id}' from the Hugging Face Hub (no network?); "
                          f"{_fetch_hint(repo_id)}", key=key) from None
    except RepositoryNotFoundError:
        raise ConfigError(f"'{repo_id}' is not a model on the Hugging Face Hub (or it is private: log in with "
                          "`huggingface-cli login`)", key=key) from None
    except HfHubHTTPError as e:
        raise ConfigError(f"the Hugging Face Hub refused '{repo_id}': {str(e).splitlines()[0]}", key=key) from None
    except Exception as e:  # no network, proxy, timeout: whatever the HTTP stack raises
        raise ConfigError(f"could not download '{repo_id}' from the Hugging Face Hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no detail'}); {_fetch_hint(repo_id)}", key=key) from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"the cached '{repo_id}' ({folder}) has no config.json: not a transformers model, or only "
                          "part of it was downloaded", key=key)
    return folder


def _model_patterns(repo_id: str) -> list[str]:
    """What to download: config, tokenizer and weights, PyTorch ``.bin`` only when there is no safetensors."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo_id)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    return _MODEL_FILES if has_safetensors else [*_MODEL_FILES, "*.bin"]


@dataclass(frozen=True)
class HubModel:
    """A model in the local Hub cache, for ``tuneforge models``."""

    repo_id: str
    folder: Path  # the snapshot refs/main points to (or the newest one)
    model_type: str
    size_bytes: int


def cached_models() -> list[HubModel]:
    """Every model repo in the local Hub cache that has a snapshot with a config.json, by id."""
    root = hub_cache_dir()
    out = []
    for repo in sorted(root.glob("models--*")) if root.is_dir() else []:
        folder = _snapshot(repo)
        if folder is None or not (folder / "config.json").is_file():
            continue
        try:
            model_type = str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "?"))
        except (OSError, ValueError):
            model_type = "?"
        size = sum(f.stat().st_size for f in (repo / "blobs").iterdir() if f.is_file()) if (repo / "blobs").is_dir() else 0
        out.append(HubModel(repo.name.removeprefix("models--").replace("--", "/"), folder, model_type, size))
    return out


def _snapshot(repo: Path) -> Path | None:
    """The snapshot ``refs/main`` names, else the most recently written one."""
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snaps = sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime) if (repo / "snapshots").is_dir() else []
    return snaps[-1] if snaps else None


# --------------------------------------------------------------------------- data sets


def parse_hf_uri(path: str | Path) -> tuple[str, str]:
    """``hf://org/dataset[:split]`` (also as pydantic's ``hf:/org/...``) -> (repo id, split, default train)."""
    spec = HF_SCHEME.sub("", str(path), count=1)
    repo_id, _, split = spec.partition(":")
    if not is_hub_id(repo_id):
        raise DataError(f"'{path}' is not a Hub data set; expected hf://org/dataset or hf://org/dataset:split", path)
    return repo_id, split or "train"


def read_hub_dataset(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the split named by ``hf://org/dataset[:split]``, from the cache when offline."""
    repo_id, split = parse_hf_uri(path)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise DataError("reading hf:// data needs the datasets package", path) from None
    ds = _load_split(datasets, repo_id, split, path)
    return list(ds.column_names), ds.to_list()


def _load_split(datasets: Any, repo_id: str, split: str, path: str | Path) -> Any:
    cache, arrow = hub_cache_dir(), str(_datasets_cache())
    folder = _snapshot(cache / f"datasets--{repo_id.replace('/', '--')}")
    try:
        if folder is not None:  # fetched before (huggingface-cli download, or datasets itself): read it locally
            return _split(datasets.load_dataset(str(folder), cache_dir=arrow), split, path)
        if not hub_offline():
            return _split(datasets.load_dataset(repo_id, cache_dir=arrow), split, path)
        try:  # a data set that datasets itself prepared while online
            return _split(datasets.load_dataset(repo_id, cache_dir=arrow), split, path)
        except (ConnectionError, FileNotFoundError, ValueError):
            pass
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read the Hub data set '{repo_id}': {str(e).splitlines()[0]}", path) from None
    raise DataError(f"data set '{repo_id}' is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: "
                    f"{_fetch_hint(repo_id, dataset=True)}", path)


def _split(dsd: Any, split: str, path: str | Path) -> Any:
    if split not in dsd:
        raise DataError(f"no split '{split}'; the data set has: {', '.join(dsd)} (pick one with hf://org/name:SPLIT)",
                        path)
    return dsd[split]
