"""Celery tasks: the public interface. Names are stable and namespaced (hoster.snapshot.*, hoster.replication.*)."""
