"""The fetch stage's library side: put a dataset under one folder and check its layout.

`synthetic` generates the embedded corpus; `local` copies a folder (hard links where possible) or
extracts the competition zip as downloaded; `kaggle` downloads the competition with the `kaggle`
package and extracts it. Whatever the source, the result must be a layout ctclab recognises.
"""
from __future__ import annotations

import os
import shutil
import zipfile
import zlib
from pathlib import Path

from . import corpus, kaggle, layouts
from .config import DataConfig
from .errors import CtclabError


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _extract(zip_path: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(dest)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # not a zip, cut short, or a damaged member
        raise CtclabError(f"{zip_path}: not a valid zip file ({type(err).__name__}: {str(err)[:80]}); expected the "
                          "competition archive as downloaded: download it again") from None


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def fetch(cfg: DataConfig, out: str | Path, progress: bool = True, kaggle_api=None) -> layouts.Layout:
    """Materialise cfg's dataset in `out` (replacing it) and return its detected layout."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if cfg.source == "synthetic":
            s = cfg.synthetic
            corpus.generate(tmp, s.seed, {"train": s.train, "dev": s.dev, "test": s.test}, s.min_words,
                            s.max_words, s.workers, progress)
        elif cfg.source == "local":
            src = Path(cfg.path).expanduser()
            if src.is_file() and src.suffix == ".zip":
                _extract(src, tmp)
            elif src.is_dir():
                layouts.detect(src)  # fail before copying anything
                shutil.copytree(src, tmp, copy_function=_link_or_copy)
            else:
                raise CtclabError(f"data.path = {cfg.path!r}: no such folder or .zip file; expected the "
                                  "dataset folder or the competition zip as downloaded")
        else:  # kaggle
            download_dir = out.with_name(out.name + ".download")
            archive = kaggle.download(cfg.competition, download_dir, kaggle_api)
            if archive.suffix == ".zip":
                _extract(archive, tmp)
                shutil.rmtree(download_dir)
            else:
                download_dir.rename(tmp)
        layouts.detect(tmp)
    except BaseException:  # an error or an interrupt: nothing half-made is left beside `out`
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out)
    return layouts.detect(out)
