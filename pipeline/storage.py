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
    """``(pyarrow filesystem, path inside it)`` for a local path or an ``s3://`` URI (an
    :class:`ObjectStore`: S3 without directory markers, see there)."""
    if not is_s3(path):
        return pafs.LocalFileSystem(), str(Path(path).absolute())
    u = urlparse(path)
    if not u.netloc:
        raise ValueError(f"bad S3 URI (no bucket): {path}")
    endpoint = s3_endpoint(s3)
    region = (s3.region if s3 else None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pafs.PyFileSystem(ObjectStore(endpoint, region or "us-east-1")), f"{u.netloc}{u.path}".rstrip("/")


class ObjectStore(pafs.FileSystemHandler):
    """pyarrow's S3 filesystem, minus the directory markers.

    pyarrow emulates directories on S3 with empty ``key/`` objects: ``create_dir`` writes one, and
    deleting a file or a directory writes one for the parent left behind. A store that maps keys
    to files (``rclone serve s3``, MinIO on a plain filesystem, Ceph RGW with some settings) cannot
    hold an object named ``dir/`` next to the directory ``dir`` and refuses it (rclone: "file
    already exists", then its view of that directory is wrong). Object stores have no
    directories, so here ``create_dir`` does nothing and deletes go through boto3 (no parent
    marker); reads, writes and listings are pyarrow's own. Ray Train gets this filesystem as its
    ``storage_filesystem`` too (it creates its run directory with ``create_dir``)."""

    def __init__(self, endpoint: str | None, region: str):
        self.endpoint, self.region = endpoint, region
        kwargs: dict = {"region": region}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        self.fs = pafs.S3FileSystem(**kwargs)

    def __reduce__(self):  # Ray ships the filesystem to its workers
        return ObjectStore, (self.endpoint, self.region)

    def _client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region)

    def get_type_name(self) -> str:
        return "s3"

    def equals(self, other) -> bool:
        return isinstance(other, ObjectStore) and (other.endpoint, other.region) == (self.endpoint, self.region)

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        pass  # a key prefix exists as soon as an object is written under it

    def _delete_keys(self, bucket: str, keys: list[str]) -> None:
        client = self._client()
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            out = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                                "Quiet": True})
            if out.get("Errors"):
                e = out["Errors"][0]
                raise OSError(f"deleting s3://{bucket}/{e.get('Key')}: {e.get('Code')} {e.get('Message')}")

    def delete_dir_contents(self, path, missing_dir_ok=False):
        bucket = str(path).strip("/").partition("/")[0]
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        keys = [i.path.partition("/")[2] for i in infos if i.type == pafs.FileType.File]
        if not keys and not missing_dir_ok:
            raise FileNotFoundError(f"no objects under s3://{path}")
        self._delete_keys(bucket, keys)

    def delete_dir(self, path):
        self.delete_dir_contents(path)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete every bucket's contents")

    def delete_file(self, path):
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(path)
        bucket, _, key = str(path).partition("/")
        self._delete_keys(bucket, [key])

    def move(self, src, dest):
        self.fs.copy_file(src, dest)
        self.delete_file(src)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


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


class StoreError(RuntimeError):
    """An object store the pipeline cannot use, said in one line (never with credentials)."""


_CAUSES = (  # substrings of pyarrow/AWS error texts -> the likely cause, most specific first
    (("MissingContentLength", "HTTP status 411"), "the store rejects streamed checksums: set "
     "AWS_REQUEST_CHECKSUM_CALCULATION=when_required and AWS_RESPONSE_CHECKSUM_VALIDATION=when_required"),
    (("NoSuchBucket", "bucket does not exist"), "the bucket does not exist (create it first)"),
    (("InvalidAccessKeyId", "SignatureDoesNotMatch", "credentials", "Unauthorized"),
     "wrong or missing credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)"),
    (("AccessDenied", "Access Denied", "HTTP status 403", "Forbidden"),
     "the credentials may not do this here (read-only credentials, or a bucket policy)"),
    (("Couldn't connect", "Could not connect", "Connection refused", "curlCode", "Timeout", "timed out"),
     "the endpoint is not reachable (AWS_ENDPOINT_URL / data.s3.endpoint_url, network)"),
)


def probe(prefix: str, s3: S3Config | None = None) -> None:
    """Write, list, read back and delete one small object under ``prefix``; a store the pipeline
    cannot use raises :class:`StoreError` naming the endpoint, the operation that failed and the
    likely cause. Local paths pass."""
    if not is_s3(prefix):
        return
    import uuid

    key = join(prefix, f".score-probe-{uuid.uuid4().hex[:12]}")
    data = b"score-rl store probe\n"
    where = s3_endpoint(s3) or "the default AWS S3 endpoint"
    fs, p = filesystem(key, s3)
    steps = (("write", lambda: write_bytes(key, data, s3)),
             ("list", lambda: key in list_files(prefix, s3=s3) or _fail("the object just written is not listed")),
             ("read back", lambda: read_bytes(key, s3) == data or _fail("what was read differs from what was written")),
             ("delete", lambda: fs.delete_file(p)))
    for op, run in steps:
        try:
            run()
        except Exception as e:  # noqa: BLE001  (every failure becomes one line)
            text = f"{type(e).__name__}: {e}"
            flat = _flat(text)  # pyarrow says INVALID_ACCESS_KEY_ID where boto3 says InvalidAccessKeyId
            cause = next((c for pats, c in _CAUSES if any(_flat(x) in flat for x in pats)), None)
            if cause is None:  # e.g. a read-only rclone answers INTERNAL_FAILURE, not AccessDenied
                cause = ("the store refused the write: read-only credentials or a read-only store"
                         if op == "write" else "") + f" ({text.splitlines()[0][:160]})"
            raise StoreError(f"object store at {where} cannot be used for {prefix}: {op} of {key} failed; "
                             f"likely cause: {cause}") from None


def _flat(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _fail(why: str) -> bool:
    raise OSError(why)
