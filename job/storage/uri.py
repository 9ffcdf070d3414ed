"""Which URIs a setting accepts, decided from the text alone (no network, no disk), so that config validation and
the stores agree on one rule.

A local path is anything that does not look like a URI: `results`, `./results`, `/data/out`, `C:\\out`, `C:/out`
(a one-letter "scheme" is a Windows drive). `file:///abs/path` (or `file:/abs/path`, `file://localhost/abs/path`)
is a local path too. Anything else of the form `scheme:/...` or `scheme://...` must be a scheme the setting
supports; otherwise the job would write into a local folder named `scheme:` and lose the results with the pod.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")  # two characters at least: `C:/` is a drive
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# What each kind of setting accepts besides local paths, with the forms to suggest in a message.
ACCEPTS = {
    "source": {"s3": "s3://bucket/prefix", "hf": "a Hugging Face Hub id (org/name or hf://org/name)"},
    "destination": {"s3": "s3://bucket/prefix", "hf": "hf://org/name"},
    "checkpoints": {"s3": "s3://bucket/prefix"},
}


def scheme(uri: str) -> str | None:
    """The URI scheme, lower-cased (`s3`, `hf`, `file`, `ftp`...), or None for a local path."""
    match = SCHEME.match(uri)
    return match.group(1).lower() if match else None


def local_path(uri: str) -> Path:
    """The filesystem path of a local path or `file:` URI (percent-escapes decoded)."""
    if scheme(uri) == "file":
        return Path(unquote(urlsplit(uri).path))
    return Path(uri).expanduser()


def uri_problem(uri: str, kind: str) -> str | None:
    """None when `uri` is a local path or a well-formed URI that a `kind` of setting ("source", "destination",
    "checkpoints") accepts; else one line saying what is wrong and what is valid, to follow `SETTING=value: `."""
    found, accepts = scheme(uri), ACCEPTS[kind]
    if not uri.strip():
        return "empty; give a local path or " + " or ".join(accepts.values())
    if uri != uri.strip():
        return "has leading or trailing whitespace"
    if found is None:
        bare = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!/)", uri)  # `s3:bucket/x`: a URI missing its slashes
        if bare and bare.group(1).lower() in accepts:
            return f"write it as {accepts[bare.group(1).lower()]} (a lower-case scheme and two slashes)"
        return None
    if found == "file":
        host, path = urlsplit(uri).netloc, urlsplit(uri).path
        if host not in ("", "localhost"):
            return f"a file: URI names a path on this machine (file:///absolute/path), not on host {host!r}"
        return None if path.startswith("/") else "a file: URI needs an absolute path (file:///absolute/path)"
    if found == "hf" and kind == "checkpoints":
        return "checkpoints are not kept on the Hub (each save would be a commit); use a local path or s3://bucket/prefix"
    if found not in accepts:
        valid = ["a local path", *accepts.values()]
        return f"{found}:// is not supported; use {', '.join(valid[:-1])} or {valid[-1]}"
    if not uri.startswith(f"{found}://"):
        return f"write it as {accepts[found]} (a lower-case scheme and two slashes)"
    return _shape_problem(found, uri, kind)


def _shape_problem(found: str, uri: str, kind: str) -> str | None:
    rest = uri[len(found) + 3:].strip("/")
    if found == "s3":  # the bucket name is checked when the store is opened (preflight: `check` fails on it too)
        return None if rest else "an S3 URI names a bucket: s3://bucket/prefix"
    if kind == "destination":
        if not HUB_REPO.match(rest.removeprefix("models/")):
            return ("a Hub destination is a model repository, hf://org/name (the Hub keeps results, one commit per "
                    "run; checkpoints need a local path or s3://)")
    elif not HUB_REPO.match(re.sub(r"^(models|datasets)/", "", rest)):
        return "a Hub source is hf://org/name (hf://datasets/org/name for a dataset)"
    return None
