"""hoster-tasks: ZFS snapshots and replication for Hoster VM nodes as Celery jobs."""

__version__ = "0.1.0"
