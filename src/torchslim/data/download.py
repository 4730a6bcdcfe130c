"""Downloading data files from mirrors with checksums, into a cache or a folder the user names."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from torchslim.core.errors import ChecksumError, TorchslimError
from torchslim.core.files import write_atomic


@dataclass(frozen=True)
class RemoteFile:
    """A file of a dataset: its name, the mirrors that serve it, and the MD5s it may have.

    ``md5`` is the digest of the file as stored; ``content_md5``, for a .gz, the digest of its decompressed bytes
    (a re-compressed copy of the same data passes on that).
    """

    name: str
    mirrors: tuple[str, ...]
    md5: str | None = None
    content_md5: str | None = None


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def verify(path: Path, expected: RemoteFile, data: bytes | None = None, check: bool = True) -> bytes:
    """Check a local file against its known digests; return its content (decompressed for .gz).

    Raises ChecksumError naming the file when neither the stored nor the decompressed digest matches, or when a
    .gz file is truncated. With ``check=False`` the digests are not compared (a user's own copy of the files).
    """
    raw = path.read_bytes() if data is None else data
    if expected.name.endswith(".gz"):
        try:
            content = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ChecksumError(f"{path}: corrupt or truncated gzip file ({error}); delete it and fetch it again") from None
    else:
        content = raw
    if not check or (expected.md5 is None and expected.content_md5 is None):
        return content
    if expected.md5 is not None and md5_of(raw) == expected.md5:
        return content
    if expected.content_md5 is not None and md5_of(content) == expected.content_md5:
        return content
    wanted = expected.content_md5 or expected.md5
    raise ChecksumError(
        f"{path}: checksum mismatch (expected MD5 {wanted} of the "
        f"{'decompressed ' if expected.content_md5 else ''}content); the file is corrupt, truncated or not the "
        f"expected one: delete it and fetch it again, or, for your own copy of the data, pass verify=False (CLI: --no-verify)"
    )


def default_root() -> Path:
    """Where data lives when no root is given: $TORCHSLIM_DATA, else the user cache folder."""
    env = os.environ.get("TORCHSLIM_DATA")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("torchslim")) / "data"


def find_file(name: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def fetch(remote: RemoteFile, folder: Path, timeout: float = 60.0) -> Path:
    """Download ``remote`` into ``folder`` from its first mirror that answers with the right checksum."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / remote.name
    failures = []
    for mirror in remote.mirrors:
        url = mirror.rstrip("/") + "/" + remote.name
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "torchslim"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            failures.append(f"{url}: {error}")
            continue
        try:
            verify(target, remote, data=data)
        except ChecksumError as error:
            failures.append(f"{url}: {error}")
            continue
        write_atomic(target, data)
        return target
    raise TorchslimError(f"could not download {remote.name}: " + "; ".join(failures))


def locate(
    dataset: str, files: list[RemoteFile], root: str | os.PathLike[str] | None, download: bool, check: bool = True, checks: list[str] | None = None
) -> dict[str, bytes]:
    """Find (or download) every file of a dataset and return their verified contents by name.

    Files are looked for in ``root`` and ``root/<dataset>`` (``root`` defaults to $TORCHSLIM_DATA or the cache).
    ``check=False`` skips the checksum comparison; either way each file's outcome is appended to ``checks``.
    """
    base = Path(root).expanduser() if root is not None else default_root()
    folders = [base, base / dataset]
    contents = {}
    for remote in files:
        path = find_file(remote.name, folders)
        if path is None:
            if not download:
                raise TorchslimError(
                    f"{dataset}: {remote.name} not found; looked in {', '.join(str(f) for f in folders)}. "
                    f"Put the files there, pass root=<folder> (CLI: --data-root), set TORCHSLIM_DATA, "
                    f"or allow download"
                )
            try:
                path = fetch(remote, base / dataset)
            except TorchslimError as error:
                raise TorchslimError(
                    f"{dataset}: {remote.name} not found in {', '.join(str(f) for f in folders)} and the download "
                    f"failed ({error}). Put the files there, pass root=<folder> (CLI: --data-root) or set "
                    f"TORCHSLIM_DATA"
                ) from None
        contents[remote.name] = verify(path, remote, check=check)
        if checks is not None:
            checks.append(f"{path}: {'MD5 verified' if check else 'checksum NOT verified (verify=False)'}")
    return contents
