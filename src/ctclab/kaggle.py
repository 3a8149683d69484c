"""The Kaggle path: download a competition's data and upload a submission, via the `kaggle` package.

The package is imported lazily: a bare `import kaggle` without credentials prints a long text and
`authenticate()` calls sys.exit. We check for credentials first and turn every failure into one
CtclabError line. Credentials are never printed or logged: messages are scrubbed of their values.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CtclabError

_HOW = ("put your API token in ~/.kaggle/kaggle.json (or ~/.kaggle/access_token), or set "
        "KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN)")


def _config_dir() -> Path:
    return Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")


def has_credentials() -> bool:
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return True
    return any((_config_dir() / n).is_file() for n in ("kaggle.json", "access_token"))


def _secrets() -> list[str]:
    values = [os.environ.get(k, "") for k in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    try:
        values.append(json.loads((_config_dir() / "kaggle.json").read_text()).get("key", ""))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        values.append((_config_dir() / "access_token").read_text().strip())
    except OSError:
        pass
    return [v for v in values if len(v) >= 4]


def scrub(message: str) -> str:
    """`message` with every known credential value replaced by ***."""
    for secret in _secrets():
        message = message.replace(secret, "***")
    return message


def _api():
    if not has_credentials():
        raise CtclabError(f"Kaggle: no credentials found; {_HOW}")
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
    except SystemExit:
        raise CtclabError(f"Kaggle: the credentials were refused; {_HOW}") from None
    return api


def _fail(action: str, err: BaseException) -> CtclabError:
    # scrub first, then cut: a key straddling the cut would otherwise leave its prefix behind
    first = (scrub(str(err)).strip().splitlines() or [""])[0]
    return CtclabError(scrub(f"Kaggle: {action} failed ({type(err).__name__}: {first[:200]}); "
                             "check the competition name, that you joined it, and the network"))


def download(competition: str, dest: Path, api=None) -> Path:
    """Download `competition`'s files into dest; return the zip (or folder) it wrote."""
    api = api or _api()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        api.competition_download_files(competition, path=str(dest), quiet=False)
    except (SystemExit, Exception) as err:
        raise _fail(f"downloading {competition}", err) from None
    zips = sorted(dest.glob("*.zip"))
    return zips[0] if zips else dest


def submit(csv_path: Path, message: str, competition: str, api=None) -> None:
    api = api or _api()
    try:
        api.competition_submit(str(csv_path), message, competition)
    except (SystemExit, Exception) as err:
        raise _fail(f"submitting {csv_path} to {competition}", err) from None
