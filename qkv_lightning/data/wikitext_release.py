"""The official WikiText releases: what each archive holds (URLs, MD5, line and token counts, vocabulary size), and
the download that fetches and checks one into ``data.data_dir``."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qkv_lightning.data.archives import extract_zip_members, remove_tree
from qkv_lightning.errors import DataError
from qkv_lightning.files import temporary_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfficialRelease:
    """What the official archive of a WikiText release holds, to download and to check files against."""

    title: str
    folder: str
    urls: tuple[str, ...]
    md5: str
    lines: dict[str, int]
    tokens: dict[str, int]
    vocab_size: int


# WikiText-2 and WikiText-103 share their validation and test articles: the same files, line for line.
EVAL_LINES = {"wiki.valid.tokens": 3760, "wiki.test.tokens": 4358}
EVAL_TOKENS = {"wiki.valid.tokens": 217646, "wiki.test.tokens": 245569}


def _release(
    title: str, folder: str, md5: str, train_lines: int, train_tokens: int, vocab_size: int
) -> OfficialRelease:
    """One release: its archive at the mirror and the original address, its own training split, the shared ones."""
    return OfficialRelease(
        title=title,
        folder=folder,
        urls=(
            f"https://wikitext.smerity.com/{folder}-v1.zip",
            f"https://s3.amazonaws.com/research.metamind.io/wikitext/{folder}-v1.zip",
        ),
        md5=md5,
        lines={"wiki.train.tokens": train_lines, **EVAL_LINES},
        tokens={"wiki.train.tokens": train_tokens, **EVAL_TOKENS},
        vocab_size=vocab_size,
    )


OFFICIAL = {
    "wikitext-103": _release("WikiText-103", "wikitext-103", "9ddaacaf6af0710eda8c456decff7832", 1801350, 103227021,
                             267735),
    "wikitext-2": _release("WikiText-2", "wikitext-2", "542ccefacc6c27f945fb54453812b3cd", 36718, 2088628, 33278),
}
"""The releases: archive URLs (a mirror first, then the original address), the archive's MD5, and the line and
word-level token counts (one ``<eos>`` per line) of each file, from the WikiText paper (Merity et al., 2016)."""


def download_release(release: OfficialRelease, data_dir: Path) -> None:
    """Fetch the release's archive (trying each URL; torchvision's ``download_url``, with a progress bar), check its
    MD5 (torchvision's ``calculate_md5``) and extract its three files into ``data_dir`` with the safe extractor.

    Nothing the user has is deleted or replaced: the archive is downloaded into a new scratch folder in ``data_dir``
    (``tempfile.mkdtemp``, a name no file had), which alone is removed afterwards, and a split file that already
    exists in ``data_dir`` is kept as it is (only the missing ones are extracted).
    """
    from torchvision.datasets.utils import calculate_md5, download_url

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=temporary_prefix(data_dir / release.folder), dir=data_dir))
    except OSError as error:
        raise DataError(f"cannot create data.data_dir={data_dir} for the download ({error}).") from error
    archive = scratch / f"{release.folder}-v1.zip"
    failures = []
    try:
        for url in release.urls:
            log.info("downloading %s from %s", release.title, url)
            try:
                download_url(url, str(scratch), filename=archive.name)
                break
            except (OSError, RuntimeError, ValueError) as error:  # URLError, HTTPError, too many redirects
                archive.unlink(missing_ok=True)  # a partial download, in the scratch folder
                failures.append(f"{url}: {error}")
        else:
            raise DataError(
                f"could not download {release.title} ({'; '.join(failures)}). Without internet, put the official files "
                f"{', '.join(release.lines)} into data.data_dir={data_dir} and set data.download: false."
            )
        digest = calculate_md5(str(archive))
        if digest != release.md5:
            raise DataError(
                f"the downloaded {release.title} archive has MD5 {digest}, not the official {release.md5}: the "
                "download is damaged or the mirror serves another file. Try again, or put the official files into "
                f"{data_dir}."
            )
        kept = [name for name in release.lines if os.path.lexists(data_dir / name)]
        if kept:
            log.info("keeping the existing %s in %s (not replaced by the archive's)", ", ".join(kept), data_dir)
        members = {f"{release.folder}/{name}": data_dir / name for name in release.lines if name not in kept}
        extract_zip_members(archive, members)
    finally:
        remove_tree(scratch)  # the folder this call made, with the archive
