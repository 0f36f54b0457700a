"""Sentry for workers and beat: one event per final failure (retries are not captured), Crons for beat."""

from __future__ import annotations

from typing import Any

from hoster_tasks.settings import Settings

_initialised = False


def init_sentry(settings: Settings, component: str) -> bool:
    global _initialised
    if not settings.sentry_dsn or _initialised:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=settings.sentry_release,
        send_default_pii=False,
        integrations=[CeleryIntegration(monitor_beat_tasks=True, propagate_traces=True)],
        before_send=_scrub,
    )
    sentry_sdk.set_tag("node", settings.node_name)
    sentry_sdk.set_tag("component", component)
    _initialised = True
    return True


_SECRET_WORDS = ("password", "secret", "key_file", "token", "dsn", "redis_url")


def _scrub(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a secret from extra context before it leaves the node."""
    for section in ("extra", "contexts"):
        data = event.get(section)
        if isinstance(data, dict):
            _scrub_dict(data)
    return event


def _scrub_dict(data: dict[str, Any]) -> None:
    for k in list(data):
        if any(w in k.lower() for w in _SECRET_WORDS):
            data[k] = "[scrubbed]"
        elif isinstance(data[k], dict):
            _scrub_dict(data[k])


def report_context(**context: Any) -> None:
    """Attach dataset/node/target/stderr to the current scope so a final failure carries them."""
    try:
        import sentry_sdk
    except ImportError:
        return
    scope = sentry_sdk.get_current_scope()
    for k, v in context.items():
        if k in ("dataset", "node", "target", "vm"):
            scope.set_tag(k, str(v))
    scope.set_context("hoster_tasks", {k: v for k, v in context.items()})
