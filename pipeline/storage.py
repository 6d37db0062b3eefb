"""Paths that may be local or ``s3://bucket/prefix``.

S3 credentials come only from the standard AWS environment/config/role (pyarrow and boto3 read
them); they are never printed or logged. A custom endpoint (rclone, moto, MinIO, Ceph...) comes
from :class:`pipeline.config.S3Config` or ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.config import S3Config


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def s3_endpoint(cfg: S3Config | None = None) -> str | None:
    if cfg is not None and cfg.endpoint_url:
        return cfg.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(path: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path or an ``s3://`` URI."""
    if not is_s3(path):
        return pafs.LocalFileSystem(), str(Path(path).absolute())
    u = urlparse(path)
    if not u.netloc:
        raise ValueError(f"bad S3 URI (no bucket): {path}")
    kwargs: dict = {}
    endpoint = s3_endpoint(s3)
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = (s3.region if s3 else None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**kwargs), f"{u.netloc}{u.path}".rstrip("/")


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and ``s3://`` URIs alike."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def read_bytes(path: str, s3: S3Config | None = None) -> bytes:
    fs, p = filesystem(path, s3)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes, s3: S3Config | None = None) -> None:
    fs, p = filesystem(path, s3)
    if not is_s3(path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def list_files(path: str, suffix: str = "", s3: S3Config | None = None) -> list[str]:
    """Sorted files under ``path`` (recursive) ending in ``suffix``, as URIs of the same kind."""
    fs, p = filesystem(path, s3)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [f"s3://{f}" for f in files] if is_s3(path) else files


def exists(path: str, s3: S3Config | None = None) -> bool:
    """Whether ``path`` is a file or a non-empty directory / prefix."""
    fs, p = filesystem(path, s3)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return True
    if info.type == pafs.FileType.NotFound and not is_s3(path):
        return False
    return any(True for _ in fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True)))


def delete_tree(path: str, s3: S3Config | None = None) -> None:
    """Remove a directory / every object under a prefix (missing is fine)."""
    fs, p = filesystem(path, s3)
    try:
        fs.delete_dir(p)
    except FileNotFoundError:
        pass


def upload_dir(local: str | Path, dest: str, s3: S3Config | None = None) -> str:
    """Copy every file under a local folder to ``dest`` (local or ``s3://``); returns ``dest``."""
    local = Path(local)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        target = join(dest, f.relative_to(local).as_posix())
        if not is_s3(dest) and Path(target).resolve() == f.resolve():
            continue
        write_bytes(target, f.read_bytes(), s3)
    return dest


def download_dir(path: str, dest: str | Path, s3: S3Config | None = None) -> Path:
    """Copy every object under the ``s3://`` prefix ``path`` into the local folder ``dest``."""
    dest = Path(dest)
    fs, root = filesystem(path, s3)
    for f in list_files(path, s3=s3):
        target = dest / f[len("s3://"):][len(root):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f[len("s3://"):]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return dest


def localize(path: str, cache_dir: str | Path, s3: S3Config | None = None) -> Path:
    """A local directory with the contents of ``path``; an ``s3://`` prefix is downloaded once."""
    if not is_s3(path):
        return Path(path)
    u = urlparse(path)
    dest = Path(cache_dir) / u.netloc / u.path.strip("/")
    marker = dest / ".complete"
    if marker.exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    download_dir(path, tmp, s3)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    marker.touch()
    return dest
