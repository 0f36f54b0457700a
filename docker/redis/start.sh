#!/bin/sh
# Starts Redis for hoster-tasks (docker/compose.yml) with the password from a file, never on a command line:
# any local user reads command lines (`ps`, /proc/<pid>/cmdline) and `docker inspect` shows the container's.
# The password (the compose secret, from docker/.env) becomes the default user's SHA-256 in an ACL file
# on a tmpfs; then the image's own entrypoint starts redis-server as the unprivileged `redis` user.
# The paths can be moved for a test run: REDIS_PASSWORD_FILE, REDIS_ACL_FILE, REDIS_CONF.
set -eu

secret=${REDIS_PASSWORD_FILE:-/run/secrets/redis_password}
acl=${REDIS_ACL_FILE:-/run/redis/users.acl}
conf=${REDIS_CONF:-/usr/local/etc/redis/redis.conf}

password=$(cat "$secret")
case $password in
  "" | *[!A-Za-z0-9._~-]*)
    # URL-safe: the same password is embedded as is in the redis:// URLs of the other services
    echo "start.sh: $secret must hold a non-empty URL-safe password (openssl rand -hex 32)" >&2
    exit 1 ;;
esac

umask 077
mkdir -p "$(dirname "$acl")"
# printf is a shell builtin and sha256sum reads stdin: the password is in no process's argv
hash=$(printf '%s' "$password" | sha256sum | cut -d' ' -f1)
printf 'user default on #%s ~* &* +@all\n' "$hash" > "$acl"
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
  chown redis "$acl"  # the entrypoint runs redis-server as `redis`
fi

exec docker-entrypoint.sh redis-server "$conf" --aclfile "$acl" "$@"
