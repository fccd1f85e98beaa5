"""Pull GGUF files from a Hugging Face hub into models/, through huggingface_hub.

huggingface_hub owns the network side: it reads HF_TOKEN, HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE itself, keeps its content-addressed cache, and draws the progress bar on
stderr. This module picks the files, turns hub failures into one-line `HubError`s, and
places each file into models/ atomically.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, constants, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import (
    CacheNotFound,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

# huggingface_hub re-exports its HTTP client under this name across major versions
# (httpx before 2.0, httpx2 since), so transport errors are caught without pinning either.
from huggingface_hub.utils import httpx as hub_http

DEFAULT_PATTERN = "*.gguf"
# Listing the repo is one small JSON request; fail fast so an unreachable hub falls back
# to the cache within seconds rather than hanging the console.
LIST_TIMEOUT_SECONDS = 15.0
# Failures that say nothing about the repo itself (no network, offline mode): use the cache.
UNREACHABLE_ERRORS = (OfflineModeIsEnabled, hub_http.TransportError)


class HubError(Exception):
    """A pull failed; the message is one clear line: what is wrong and what to do."""


@dataclass(frozen=True)
class RepoListing:
    """The files of one repo revision, either as the hub lists them or as the cache holds them."""

    revision: str
    files: list[str]
    is_cached: bool


def pull_model(
    repo_id: str, pattern: str | None, models_dir: Path, echo: Callable[[str], None] = print
) -> list[Path]:
    """Download the GGUF files of `repo_id` matching `pattern` into `models_dir`; return paths."""
    listing = list_repo_files(repo_id)
    if listing.is_cached:
        echo(f"hub unavailable (offline or unreachable): using the cached copy of {repo_id}")
    chosen = select_files(repo_id, listing.files, pattern)
    pulled = []
    for name in chosen:
        echo(f"pulling {name} from {repo_id}")
        cached = download_file(repo_id, name, listing)
        pulled.append(place_file(cached, models_dir / PurePosixPath(name).name))
    return pulled


def list_repo_files(repo_id: str) -> RepoListing:
    """List the repo's files on the hub, or in the local cache when the hub cannot be reached."""
    try:
        info = HfApi().model_info(repo_id, timeout=LIST_TIMEOUT_SECONDS)
    except HFValidationError as error:
        raise HubError(f"{repo_id!r} is not a valid repo id: expected OWNER/NAME") from error
    except UNREACHABLE_ERRORS as error:
        return _cached_listing_or_raise(repo_id, error)
    except HfHubHTTPError as error:
        if _status(error) >= 500:
            return _cached_listing_or_raise(repo_id, error)
        raise _http_error(repo_id, error) from error
    except (ValueError, KeyError) as error:
        # A 200 whose body is not model info: HF_ENDPOINT points at something else.
        raise HubError(
            f"{constants.ENDPOINT} did not answer like a Hugging Face hub; check HF_ENDPOINT"
        ) from error
    files = [sibling.rfilename for sibling in info.siblings or []]
    return RepoListing(revision=info.sha or "main", files=files, is_cached=False)


def select_files(repo_id: str, files: list[str], pattern: str | None) -> list[str]:
    """Pick the files matching `pattern`; without one, insist on exactly one GGUF file."""
    glob = pattern or DEFAULT_PATTERN
    # Match the pattern against the base name too, so `*Q4_K_M.gguf` finds files in subfolders.
    matches = sorted(
        name
        for name in files
        if fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(PurePosixPath(name).name, glob)
    )
    if not matches:
        raise HubError(f"no file in {repo_id} matches {glob!r}; the repo has: {_brief(files)}")
    if pattern is None and len(matches) > 1:
        raise HubError(
            f"{repo_id} has {len(matches)} GGUF files: {', '.join(matches)}; "
            "name one with a PATTERN, e.g. '*Q4_K_M.gguf'"
        )
    return matches


def download_file(repo_id: str, name: str, listing: RepoListing) -> Path:
    """Fetch one file into the huggingface cache (or find it there) and return its cached path."""
    try:
        # Without a pinned revision the download records refs/main, which is what a later
        # offline pull resolves; from the cache, pin the cached commit and stay off the network.
        path = hf_hub_download(
            repo_id,
            name,
            revision=listing.revision if listing.is_cached else None,
            local_files_only=listing.is_cached,
        )
    except LocalEntryNotFoundError as error:
        raise _unreachable_error(repo_id, error.__cause__ or error) from error
    except EntryNotFoundError as error:
        # Listed a moment ago but gone now: the repo changed under us.
        raise HubError(f"{name} is no longer in {repo_id}; run pull again") from error
    except HfHubHTTPError as error:
        raise _http_error(repo_id, error) from error
    return Path(path)


def place_file(cached: Path, dest: Path) -> Path:
    """Put `cached` at `dest` under a temporary name, then rename, so `dest` is never partial."""
    source = cached.resolve()  # the cache's snapshot entry is a symlink to the blob
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        try:
            # A hard link costs no space or time; it fails across filesystems, so copy then.
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    except OSError as error:
        raise HubError(f"cannot write {dest}: {error.strerror or error}") from error
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _cached_listing_or_raise(repo_id: str, error: Exception) -> RepoListing:
    listing = _cached_listing(repo_id)
    if listing is None:
        raise _unreachable_error(repo_id, error) from error
    return listing


def _cached_listing(repo_id: str) -> RepoListing | None:
    """The files cached for the revision `main` pointed at when `repo_id` was last pulled."""
    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return None
    for repo in cache.repos:
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            if "main" in revision.refs:
                snapshot = revision.snapshot_path
                files = [f.file_path.relative_to(snapshot).as_posix() for f in revision.files]
                return RepoListing(revision=revision.commit_hash, files=files, is_cached=True)
    return None


def _unreachable_error(repo_id: str, error: BaseException | None) -> HubError:
    if isinstance(error, OfflineModeIsEnabled) or constants.is_offline_mode():
        return HubError(
            f"HF_HUB_OFFLINE is set and {repo_id} is not in the huggingface cache; "
            "unset HF_HUB_OFFLINE to download it"
        )
    reason = f"HTTP {_status(error)}" if isinstance(error, HfHubHTTPError) else type(error).__name__
    return HubError(
        f"cannot reach the model hub at {constants.ENDPOINT} ({reason}) and {repo_id} is not "
        "in the huggingface cache; check the network or HF_ENDPOINT, or pull it once online "
        "and use HF_HUB_OFFLINE=1 afterwards"
    )


def _http_error(repo_id: str, error: HfHubHTTPError) -> HubError:
    status = _status(error)
    where = f"{repo_id} on {constants.ENDPOINT}"
    # GatedRepoError is a RepositoryNotFoundError, so it is checked first.
    if isinstance(error, GatedRepoError) or status == 403:
        return HubError(
            f"access to {where} is restricted (gated or private): accept its terms on the hub "
            "and set HF_TOKEN to a token that may read it"
        )
    if status == 401 and not isinstance(error, RepositoryNotFoundError):
        return HubError(f"the hub refused the credentials for {where}; check HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError) or status == 404:
        return HubError(
            f"repo {where} not found; check the name (OWNER/NAME), or set HF_TOKEN if it is private"
        )
    return HubError(f"the hub answered HTTP {status} for {where}; try again later")


def _status(error: BaseException | None) -> int:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", 0) or 0


def _brief(files: list[str], limit: int = 10) -> str:
    if not files:
        return "no files"
    shown = ", ".join(sorted(files)[:limit])
    return shown if len(files) <= limit else f"{shown}, ... ({len(files)} files)"
