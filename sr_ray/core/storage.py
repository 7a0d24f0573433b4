"""URIs (local paths or ``s3://bucket/key``) to pyarrow filesystems.

One place decides how S3 is reached: the endpoint comes from the explicit
argument (a job's ``data.s3_endpoint``), else ``AWS_ENDPOINT_URL``; credentials
and region come the standard AWS way (env vars, shared files, instance role).
Everything that touches data or run storage goes through :func:`resolve`.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Iterable

import pyarrow.fs as pafs

from sr_ray.core.errors import ConfigError

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")
_SECRET_PARAM = re.compile(r"(key|secret|token|signature|credential|password|passwd|sig|auth)", re.I)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def redact(uri: str) -> str:
    """``uri`` without credentials: user info and query values become ``***`` (safe in messages and logs)."""
    uri = str(uri)
    if "://" not in uri:
        return uri
    uri = _USERINFO.sub(r"\1***@", uri)
    if "?" in uri:
        base, query = uri.split("?", 1)
        uri = base + "?" + "&".join(p.split("=", 1)[0] + "=***" for p in query.split("&"))
    return uri


def credential_problem(value: str) -> str | None:
    """Why a config value must not be a URI that carries credentials (None when it is fine).

    Credentials come the standard AWS way (environment, ~/.aws, instance or service-account role); one
    inside a URI would be written into config.yaml, summaries and logs.
    """
    value = str(value)
    if "://" not in value:
        return None
    if _USERINFO.match(value):
        return "a URI with user info (user:secret@)"
    query = value.split("?", 1)[1] if "?" in value else ""
    names = [p.split("=", 1)[0] for p in query.split("&") if p]
    if any(_SECRET_PARAM.search(n) for n in names):
        return "a URI with credentials in its query"
    return None


def check_output_dir(uri: str, key: str, endpoint: str | None = None) -> None:
    """Refuse an output location that is a file (or lies under one) before any work: ConfigError naming ``key``."""
    fs, path = resolve(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"{key}={redact(uri)} is a file; expected a folder (created when missing)")
    if isinstance(fs, pafs.LocalFileSystem):
        parent = Path(path).parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"{key}={redact(uri)}: {parent} is a file, so no folder can be made under it")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"{key}={redact(uri)}: {parent} is not writable")


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "efs",
                       "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.glusterfs")


def mount_type(path: str, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount holding local ``path`` (the longest mount point above it), or None when
    ``mounts`` cannot be read."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target, best, kind = os.path.realpath(path), "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def is_shared(uri: str) -> bool:
    """Whether every node of a cluster sees ``uri``: object storage, a Hugging Face hub id, or a local path on a
    network filesystem (NFS, EFS, Lustre, a FUSE bucket mount...)."""
    if "://" in str(uri) or str(uri).startswith("hf-hub:"):
        return True
    kind = mount_type(uri)
    return kind is not None and (kind in NETWORK_FILESYSTEMS or kind.startswith("nfs"))


def s3_filesystem(endpoint: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem; endpoint from the argument or ``AWS_ENDPOINT_URL``."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict = {}
    if endpoint:
        scheme = "https"
        host = endpoint
        if "://" in endpoint:
            scheme, host = endpoint.split("://", 1)
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # S3-compatible servers ignore it; avoids a lookup
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (filesystem, path inside it). Local paths are made absolute."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(endpoint), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {redact(uri)!r}: use a local path or s3://bucket/key")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def is_absolute(uri: str) -> bool:
    """A local path from / or a URI with a scheme (s3://, and others that :func:`resolve` then refuses)."""
    return str(uri).startswith("/") or "://" in str(uri)


def remove_file(uri: str, endpoint: str | None = None) -> None:
    """Delete one file (local or s3://); nothing when it is not there."""
    fs, path = resolve(uri, endpoint)
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def remove_tree(uri: str, endpoint: str | None = None) -> None:
    """Delete a folder and everything under it (local or s3://); nothing when it is not there."""
    fs, path = resolve(uri, endpoint)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):].rstrip("/"), *parts)
    return str(Path(uri).expanduser().joinpath(*parts))


def to_uri(path: str, s3: bool) -> str:
    """A path as an S3 filesystem reports it (``bucket/key``) back to a URI; local paths and URIs unchanged."""
    return f"s3://{path}" if s3 and "://" not in str(path) else str(path)


def exists(uri: str, endpoint: str | None = None) -> bool:
    fs, path = resolve(uri, endpoint)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, endpoint: str | None = None, fs: pafs.FileSystem | None = None) -> bytes:
    if fs is None:
        fs, path = resolve(uri, endpoint)
    else:
        path = _path_in(uri, fs)
    with fs.open_input_stream(path) as f:
        return f.read()


def _path_in(uri: str, fs: pafs.FileSystem) -> str:
    return uri[len("s3://"):] if is_s3(uri) else str(Path(uri).expanduser().resolve())


def write_bytes(uri: str, data: bytes, endpoint: str | None = None, fs: pafs.FileSystem | None = None) -> None:
    """Write atomically on local disk (temp file + rename); S3 puts are atomic.

    Pass ``fs`` (from :func:`resolve`) to reuse one filesystem over many writes.
    """
    if fs is None:
        fs, path = resolve(uri, endpoint)
    else:
        path = _path_in(uri, fs)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str, endpoint: str | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), endpoint)


def write_parquet(table, uri: str, endpoint: str | None = None, **kwargs) -> None:
    """Write a pyarrow Table as one Parquet file, atomically (see :func:`write_bytes`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, **kwargs)
    write_bytes(uri, buf.getvalue().to_pybytes(), endpoint)


def list_files(uri: str, suffixes: Iterable[str] = (".parquet",), endpoint: str | None = None,
               ignored: list[str] | None = None) -> list[str]:
    """Files under ``uri`` (recursively) whose names end with one of ``suffixes``; sorted paths.

    ``ignored``, when given, receives the other visible files (a README, a .csv beside the shards), so a
    caller can say what it skipped instead of skipping it silently.
    """
    fs, path = resolve(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{redact(uri)} does not exist")
    if info.type == pafs.FileType.File:
        return [path]
    sel = pafs.FileSelector(path, recursive=True)
    suffixes = tuple(suffixes)
    root = path.rstrip("/") + "/"

    def hidden(p: str) -> bool:  # Hadoop/Spark convention: _name and .name files and folders are not data
        return any(part.startswith((".", "_")) for part in p[len(root):].split("/"))

    files = [i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File and not hidden(i.path)]
    if ignored is not None:
        ignored.extend(sorted(p for p in files if not p.endswith(suffixes)))
    return sorted(p for p in files if p.endswith(suffixes))


def data_file_names(uri: str, endpoint: str | None = None) -> set[str]:
    """Names of the data files (see :func:`list_files`) under ``uri`` in one listing; empty when it does not exist.

    What a resumable job asks to find its finished shards (one listing, not one request per shard).
    """
    try:
        return {posixpath.basename(p) for p in list_files(uri, endpoint=endpoint)}
    except FileNotFoundError:
        return set()


def local_copy(uri: str, prefix: str = "sr-ray-") -> str:
    """A local path to ``uri``'s contents: local paths as they are, an s3:// folder copied to a new temp folder."""
    if not is_s3(uri):
        return uri
    import tempfile

    fs, path = resolve(uri)
    tmp = tempfile.mkdtemp(prefix=prefix)
    pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp


def upload_dir(local_dir: str | os.PathLike, uri: str, endpoint: str | None = None) -> None:
    """Copy a local directory tree to ``uri`` (no-op when it is the same local path)."""
    local_dir = Path(local_dir)
    fs, dest = resolve(uri, endpoint)
    if isinstance(fs, pafs.LocalFileSystem) and Path(dest) == local_dir.resolve():
        return
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(str(local_dir.resolve()), dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
