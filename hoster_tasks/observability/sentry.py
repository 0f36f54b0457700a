"""Sentry for workers and beat: one event per final failure (retries are not captured), Crons for beat.

What leaves the node is scrubbed in `before_send` (which sentry-sdk also runs for Crons check-ins):
- frame local variables are not sent at all (`include_local_variables=False`): they hold Settings, Endpoint
  and Redis objects whose reprs carry the Redis URL and key paths;
- every string of the event (exception messages, contexts, breadcrumbs, tags) has this node's secrets
  replaced: the Redis URL's password, the SSH key_file paths of the targets, the DSN's key; any other
  `scheme://user:password@` URL loses its password;
- values under keys that name a secret (password, key_file, ...) are replaced.

Crons: `CeleryIntegration(monitor_beat_tasks=True)` sends IN_PROGRESS from beat when an entry is dispatched,
with a monitor_config built from the entry's schedule only (sentry-sdk 2.x: `_apply_crons_data_to_schedule_entry`,
no `max_runtime`). sentry-sdk would close it when beat's task ends; the fan-outs take it over and close it when
their last node job ends, with that outcome (crons.py). `before_send` adds `max_runtime` and `checkin_margin`
to every check-in's monitor_config, per entry-name prefix (`CRON_MAX_RUNTIME_MINUTES`), so a long run is not
marked timed out by Sentry; a run whose job was lost with its worker is, at `max_runtime`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from hoster_tasks.settings import Settings

_initialised = False

# Sentry Crons: minutes a beat job may stay IN_PROGRESS before Sentry marks it timed out, by the beat entry
# name's prefix (beat_schedule.py names entries snapshot-<name> and replicate-<name>). A full replication of
# a large VM over a slow link takes hours; 24 h leaves room for it without hiding a hung job for days.
CRON_MAX_RUNTIME_MINUTES: dict[str, int] = {"replicate-": 24 * 60, "snapshot-": 2 * 60}
CRON_DEFAULT_MAX_RUNTIME_MINUTES = 24 * 60
# Minutes after its scheduled time before Sentry counts a check-in as missed (beat may start a job late).
CRON_CHECKIN_MARGIN_MINUTES = 5

SCRUBBED = "[scrubbed]"
_SECRET_WORDS = ("password", "passwd", "secret", "key_file", "private_key", "token", "dsn", "redis_url")
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*:)[^\s/@]+@")


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
        include_local_variables=False,
        integrations=[CeleryIntegration(monitor_beat_tasks=True, propagate_traces=True)],
        before_send=make_before_send(settings),
    )
    scope = sentry_sdk.get_global_scope()  # every task's scope and every process forked from here
    scope.set_tag("node", settings.node_name)
    scope.set_tag("component", component)
    _initialised = True
    return True


def cron_monitor_extra(monitor_slug: str | None) -> dict[str, int]:
    """What a beat entry's Crons monitor_config gets on top of the schedule sentry-sdk derives."""
    runtime = CRON_DEFAULT_MAX_RUNTIME_MINUTES
    for prefix, minutes in CRON_MAX_RUNTIME_MINUTES.items():
        if (monitor_slug or "").startswith(prefix):
            runtime = minutes
            break
    return {"max_runtime": runtime, "checkin_margin": CRON_CHECKIN_MARGIN_MINUTES}


def secret_values(settings: Settings) -> dict[str, str]:
    """This node's secret strings -> what replaces them in anything sent to Sentry (longest first)."""
    found: dict[str, str] = {}
    for url in (settings.redis_url, settings.sentry_dsn):
        if not url:
            continue
        try:
            parts = urlsplit(url)
        except ValueError:
            continue
        if parts.password:
            found[parts.password] = SCRUBBED
    if settings.sentry_dsn:
        key = urlsplit(settings.sentry_dsn).username
        if key and len(key) >= 8:  # a real DSN key (not a short word that would mangle ordinary text)
            found[key] = SCRUBBED
    for target in settings.targets:
        if target.key_file is not None:
            found[str(target.key_file)] = "[key_file]"
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def make_before_send(settings: Settings) -> Any:
    secrets = secret_values(settings)

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
        if event.get("type") == "check_in":
            config = event.get("monitor_config")
            if isinstance(config, dict):
                for k, v in cron_monitor_extra(event.get("monitor_slug")).items():
                    config.setdefault(k, v)
        return scrub(event, secrets)

    return before_send


def scrub(data: Any, secrets: dict[str, str]) -> Any:
    """`data` with secret values replaced in every string and secret-named keys' values replaced."""
    if isinstance(data, str):
        return _scrub_text(data, secrets)
    if isinstance(data, dict):
        return {
            k: (SCRUBBED if isinstance(k, str) and _secret_key(k) and v not in (None, "") else scrub(v, secrets))
            for k, v in data.items()
        }
    if isinstance(data, list | tuple):
        return [scrub(v, secrets) for v in data]
    return data


def _secret_key(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _SECRET_WORDS)


def _scrub_text(text: str, secrets: dict[str, str]) -> str:
    for value, replacement in secrets.items():
        if value in text:
            text = text.replace(value, replacement)
    return _URL_PASSWORD.sub(lambda m: m["head"] + SCRUBBED + "@", text)


def report_context(**context: Any) -> None:
    """Attach dataset/node/target/stderr to the current scope so a final failure carries them."""
    try:
        import sentry_sdk
    except ImportError:
        return
    scope = sentry_sdk.get_current_scope()
    for k, v in context.items():
        if k in ("dataset", "node", "target", "vm") and v is not None:
            scope.set_tag(k, str(v))
    scope.set_context("hoster_tasks", {k: v for k, v in context.items() if v is not None})
