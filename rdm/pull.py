"""`rdm pull NAME`: download a published asset (rdm.models.assets), verify it, and install what it becomes.

  1. Where from: --url (a URL or the path of a copy fetched elsewhere), else $RDM_PULL_URL_<NAME>,
     else $RDM_PULL_MIRROR + the file's name, else the publisher's URL.
  2. Download (rdm.models.download: resumable, atomic) and verify: a digest pinned in the registry or given
     with --sha256, else the digest recorded at the first download (trust on first use, in
     $RDM_HOME/digests.json); the first download's digest is recorded.
  3. Install: a model checkpoint is converted (nothing in its pickle runs) into $RDM_HOME/models/NAME;
     a databases zip is unpacked and each CompVis .npz becomes a database in the databases' home.

The converter (torch, diffusers) is imported only once a checkpoint is there to convert, so that an
offline pull fails in well under a second.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .build import build_index
from .db import store
from .errors import RDMError
from .models.assets import MIRROR_ENV, Asset, asset, downloads_home, models_home, rdm_home
from .models.download import DigestBook, DigestMismatch, DownloadError, Fetched, fetch, is_local, progress_enabled

DIGESTS = "digests.json"


@dataclass
class PullResult:
    """What a pull installed (or found installed)."""

    asset: str
    kind: str  # "model" or "databases"
    installed: list[Path] = field(default_factory=list)  # the model folder, or the database folders
    already: bool = False  # everything was installed before; nothing was downloaded


def source_url(a: Asset, url: str | None = None) -> str:
    """Where to fetch the asset's file: --url, $RDM_PULL_URL_<NAME>, $RDM_PULL_MIRROR/FILE, the publisher."""
    if url:
        return url
    if os.environ.get(a.url_env):
        return os.environ[a.url_env]
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV].rstrip("/") + "/" + a.filename
    return a.url


def digest_book() -> DigestBook:
    return DigestBook(rdm_home() / DIGESTS)


def offline_hint(a: Asset) -> str:
    """What to do when the asset's host cannot be reached."""
    return (f"If this machine is offline:\n"
            f"  - download {a.url} on a machine with a network and pass the copy: rdm pull {a.name} --url PATH\n"
            f"  - or point at a mirror you can reach: rdm pull {a.name} --url URL, ${a.url_env}=URL, "
            f"or ${MIRROR_ENV}=BASE_URL (a folder holding {a.filename})")


def fetch_verified(a: Asset, filename: str, url: str, sha256: str | None, progress: bool | None,
                   log: Callable[[str], None], hint: str | None = None) -> Fetched:
    """Download one file of asset `a` into $RDM_HOME/downloads/NAME/ and verify it (see the module docstring)."""
    book, key = digest_book(), f"{a.name}/{filename}"
    recorded = book.get(key)
    pinned = a.sha256 if filename == a.filename else None
    if sha256:
        expected, why = sha256.lower(), "the --sha256 given"
    elif pinned:
        expected, why = pinned, "the digest pinned in rdm"
    elif recorded:
        expected, why = recorded["sha256"], (f"the digest recorded at its first download ({recorded['recorded']}, "
                                             f"from {recorded['url']})")
    else:
        expected, why = None, ""
    dest = downloads_home() / a.name / filename
    if expected and dest.is_file() and store.sha256_file(dest) == expected:  # kept by --keep, or a failed install
        log(f"sha256 {expected} of {dest} matches {why}: not downloaded again")
        return Fetched(dest, expected, dest.stat().st_size)
    log(f"fetching {url}" + (" (a local copy)" if is_local(url) else ""))
    try:
        got = fetch(url, dest, expected, why, progress, hint or offline_hint(a))
    except DigestMismatch as e:
        raise DownloadError(f"{e}. This copy is not the file rdm knows as {key}: use another mirror (--url), or, "
                            f"if you trust this file, pass --sha256 {e.actual}") from None
    if got.resumed_from:
        log(f"resumed an interrupted download after {got.resumed_from} bytes")
    if expected is None or (sha256 and (recorded or {}).get("sha256") != expected):
        book.record(key, got.sha256, got.size, url)
        what = "replaced the recorded digest (--sha256)" if recorded else "first download: recorded"
        log(f"sha256 {got.sha256}: {what} in {book.path} (trust on first use); every later copy or mirror of "
            f"{key} must match it")
    else:
        log(f"sha256 {got.sha256} matches {why}")
    return got


# --- Models -----------------------------------------------------------------------------------------

def _config_file(a: Asset, config: str | None, progress: bool | None, log: Callable[[str], None]) -> Path:
    """The model's CompVis config.yaml: --config (a path or URL), else the asset's, verified like its checkpoint."""
    if config and is_local(config):
        path = Path(config).expanduser()
        if not path.is_file():
            raise RDMError(f"--config {config}: no such file")
        return path
    if config:
        log(f"fetching {config} (--config: the model's config, your choice, not checked against a record)")
        return fetch(config, downloads_home() / a.name / Path(config).name, progress=progress).path
    hint = (f"If this machine is offline, give the model's CompVis config.yaml: rdm pull {a.name} --config PATH "
            f"(a copy of {a.config_url})")
    return fetch_verified(a, a.config_url.rsplit("/", 1)[-1], a.config_url, None, progress, log, hint).path


def install_model(a: Asset, url: str | None, config: str | None, sha256: str | None, clip: str | None,
                  force: bool, keep: bool, progress: bool | None, log: Callable[[str], None]) -> PullResult:
    """Download the checkpoint (and config) of a model asset and convert it into $RDM_HOME/models/NAME."""
    out = models_home() / a.name
    if (out / "rdm_config.json").is_file() and not force:
        log(f"{a.name} is already installed in {out} (--force downloads and converts it again)")
        return PullResult(a.name, a.kind, [out], already=True)
    source = source_url(a, url)
    config_path = _config_file(a, config, progress, log)
    ckpt = fetch_verified(a, a.filename, source, sha256, progress, log)
    log(f"converting {ckpt.path.name} (memory-mapped; nothing in the checkpoint is executed)")
    from .sampling.generate import convert  # torch and diffusers: seconds to import

    result = convert(ckpt.path, config_path, clip or a.clip, out, overwrite=force, checkpoint_sha256=ckpt.sha256,
                     origin={"asset": a.name, "url": source})
    if result.note:
        log(result.note)
    if not keep:
        ckpt.path.unlink()
    log(f"model {a.name}: {result.path} (CLIP {result.embedder['model']}, dim {result.embedder['dim']})")
    return PullResult(a.name, a.kind, [result.path])


# --- Databases --------------------------------------------------------------------------------------

def database_of(member: str, a: Asset) -> str | None:
    """The database a zip member belongs to: a path part (folder or file stem) named after one."""
    parts = Path(member).parts
    names = {*a.databases, *(n.split("-", 1)[1] for n in a.databases if "-" in n)}
    for part in reversed([Path(parts[-1]).stem, *parts[:-1]]):
        if part in names:
            return part if part in a.databases else next(n for n in a.databases if n.endswith("-" + part))
    return None


def _merge_npz(files: list[Path], out: Path) -> Path:
    """Several CompVis .npz files of one database -> one, the arrays concatenated in file-name order."""
    if len(files) == 1:
        return files[0]
    arrays: dict[str, list[np.ndarray]] = {}
    for f in sorted(files):
        with np.load(f, allow_pickle=False) as z:
            for key in z.files:
                arrays.setdefault(key, []).append(z[key])
    keys = [k for k, v in arrays.items() if len(v) == len(files)]  # keys every file holds
    np.savez(out, **{k: np.concatenate(arrays[k]) for k in keys})
    return out


def unpack_databases(archive: Path, a: Asset, work: Path) -> dict[str, Path]:
    """{database name: one .npz} from a zip of CompVis databases (members are copied, never extracted by name)."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise RDMError(f"{archive} is not a zip file; is --url the {a.name} archive?") from None
    found: dict[str, list[Path]] = {}
    with zf:
        for i, info in enumerate(m for m in zf.infolist() if m.filename.endswith(".npz") and not m.is_dir()):
            name = database_of(info.filename, a)
            if name is None:
                continue
            dest = work / f"{name}.{i}.npz"  # our own name: a member's path never decides where it lands
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            found.setdefault(name, []).append(dest)
    if not found:
        raise RDMError(f"{archive} holds no .npz database of {a.name} (expected folders named "
                       f"{', '.join(a.databases[:3])}, ...)")
    return {name: _merge_npz(files, work / f"{name}.npz") for name, files in found.items()}


def install_databases(a: Asset, url: str | None, sha256: str | None, clip: str | None, force: bool, keep: bool,
                      indexes: str | None, progress: bool | None, log: Callable[[str], None]) -> PullResult:
    """Download a zip of CompVis .npz databases and build each one (its vectors as they are) by name."""
    present = set(store.list_databases(indexes))
    if set(a.databases) <= present and not force:
        log(f"{a.name} is already installed: {', '.join(a.databases)} in {store.indexes_home(indexes)} "
            "(--force downloads and rebuilds them)")
        return PullResult(a.name, a.kind, [store.resolve(n, indexes) for n in a.databases], already=True)
    archive = fetch_verified(a, a.filename, source_url(a, url), sha256, progress, log)
    work = downloads_home() / a.name / "unpacked"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    installed = []
    try:
        files = unpack_databases(archive.path, a, work)
        missing = [n for n in a.databases if n not in files]
        if missing:
            log(f"warning: the archive holds no {', '.join(missing)}")
        for name in (n for n in a.databases if n in files):
            if name in present and not force:
                log(f"database {name}: kept (already installed)")
                installed.append(store.resolve(name, indexes))
                continue
            report = build_index(str(files[name]), name=name, clip=clip or a.clip, indexes=indexes,
                                     overwrite=name in present, progress=progress_enabled(progress))
            log(f"database {name}: {report.total} items, {report.index_factory} ({report.path})")
            installed.append(Path(report.path))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not keep:
        archive.path.unlink()
    return PullResult(a.name, a.kind, installed)


# --- The command ------------------------------------------------------------------------------------

def pull(name: str, url: str | None = None, config: str | None = None, sha256: str | None = None,
         clip: str | None = None, force: bool = False, keep: bool = False, indexes: str | None = None,
         progress: bool | None = None, log: Callable[[str], None] = print) -> PullResult:
    """`rdm pull`: fetch asset `name`, verify it, install it; `log` receives one line per step.

    `clip` overrides the asset's CLIP (a mirror holding vectors or a model made with another one);
    `keep` keeps the downloaded file in $RDM_HOME/downloads; `progress` None: bars on a terminal only.
    """
    a = asset(name)
    if sha256 is not None and not (len(sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha256)):
        raise RDMError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if config is not None and a.kind != "model":
        raise RDMError(f"--config gives a model's config.yaml; {a.name} is a set of databases")
    if url and is_local(url) and not Path(url.removeprefix("file://")).expanduser().is_file():
        raise RDMError(f"--url {url}: no such file (give a URL, or the path of a downloaded copy)")
    if a.kind == "model":
        return install_model(a, url, config, sha256, clip, force, keep, progress, log)
    return install_databases(a, url, sha256, clip, force, keep, indexes, progress, log)
