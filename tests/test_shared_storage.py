"""Which paths every node of a cluster sees (``storage.is_shared``) and the refusal of a local one on several nodes
(``ray_utils.require_shared_storage``; the refusal on a real multi-node cluster: tests/test_multinode.py)."""

from __future__ import annotations

import pytest

from sr_ray.core import storage
from sr_ray.core.errors import ConfigError
from sr_ray.core.ray_utils import require_shared_storage

MOUNTS = """\
/dev/root / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fs-0123.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0
10.0.0.5:/export /mnt/nfs\\040share nfs rw 0 0
mybucket /mnt/bucket fuse.mountpoint-s3 rw 0 0
/dev/nvme1n1 /mnt/efs/local-cache xfs rw 0 0
"""


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


@pytest.mark.parametrize("path, kind", [
    ("/home/ray/runs", "ext4"), ("/tmp/x", "tmpfs"), ("/mnt/efs/runs/a", "nfs4"), ("/mnt/efs", "nfs4"),
    ("/mnt/nfs share/runs", "nfs"), ("/mnt/bucket/runs", "fuse.mountpoint-s3"),
    ("/mnt/efs/local-cache/runs", "xfs"),  # the longest mount point above the path decides
    ("/mnt/efsx/runs", "ext4"),  # a mount point is a whole path component, not a prefix of a name
])
def test_mount_type_is_the_longest_mount_point_above_the_path(mounts, path, kind):
    assert storage.mount_type(path, mounts) == kind


def test_unreadable_mount_table_says_nothing(tmp_path):
    assert storage.mount_type("/mnt/efs", str(tmp_path / "missing")) is None


def test_object_storage_and_network_mounts_are_shared(monkeypatch, mounts):
    real = storage.mount_type
    monkeypatch.setattr(storage, "mount_type", lambda p, m=mounts: real(p, m))
    assert storage.is_shared("s3://bucket/runs") and storage.is_shared("gs://bucket/runs")
    assert storage.is_shared("/mnt/efs/runs") and storage.is_shared("/mnt/bucket/runs")
    assert not storage.is_shared("/home/ray/runs") and not storage.is_shared("/mnt/efs/local-cache/runs")


def test_local_path_refused_only_on_several_nodes(monkeypatch):
    import sr_ray.core.ray_utils as ray_utils

    monkeypatch.setattr(ray_utils, "alive_nodes", lambda: 1)
    require_shared_storage("/home/ray/runs", "run.storage_path", "Ray Train's workers write checkpoints")
    monkeypatch.setattr(ray_utils, "alive_nodes", lambda: 3)
    monkeypatch.setattr(storage, "mount_type", lambda p: "ext4")
    with pytest.raises(ConfigError, match=r"run.storage_path=/home/ray/runs is a local path, but this Ray cluster "
                                          r"has 3 nodes and Ray Train's workers write checkpoints on whichever"):
        require_shared_storage("/home/ray/runs", "run.storage_path", "Ray Train's workers write checkpoints")
    require_shared_storage("s3://b/runs", "run.storage_path", "x")
    monkeypatch.setenv("SR_RAY_SHARED_STORAGE", "1")  # the user vouches for a mount the check cannot see
    require_shared_storage("/home/ray/runs", "run.storage_path", "x")
