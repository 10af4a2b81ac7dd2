#!/usr/bin/env bash
# Run a command against a throwaway, non-persistent redis-server.
#
#   scripts/with-redis.sh .venv/bin/pytest -x
#
# Exports DSPEX_TEST_REDIS_URL for the command; the server and its temp dir are
# removed on exit, and the command's exit status is passed through.
# If DSPEX_TEST_REDIS_URL is already set, the command runs against that server
# instead (reuse a server you started yourself). NOTE: tests flush it.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi

# Keep litellm (pulled in by dspy) off the network: use its bundled model cost
# map instead of fetching one at import time. Set in both modes; caller wins.
export LITELLM_LOCAL_MODEL_COST_MAP="${LITELLM_LOCAL_MODEL_COST_MAP:-True}"
export LITELLM_OFFLINE_MODE="${LITELLM_OFFLINE_MODE:-true}"

if [[ -n "${DSPEX_TEST_REDIS_URL:-}" ]]; then
    exec "$@"
fi

for tool in redis-server redis-cli python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "with-redis: '$tool' not found on PATH (try: make redis)" >&2
        exit 127
    fi
done

tmp="$(mktemp -d "${TMPDIR:-/tmp}/dspex-redis.XXXXXX")"
redis_pid=""

cleanup() {
    local rc=$?
    if [[ -n "$redis_pid" ]] && kill -0 "$redis_pid" 2>/dev/null; then
        kill -TERM "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
# Until the command starts, a signal just exits (the EXIT trap reaps redis).
trap 'exit 130' INT
trap 'exit 143' TERM

# Ask the kernel for a free port. There is a small window before redis binds it;
# acceptable for a dev/CI helper.
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

# Log to a file so redis' banner does not interleave with the command's output.
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$tmp" --logfile "$tmp/redis.log" --daemonize no &
redis_pid=$!

# Wait up to 10 s (100 x 0.1 s) for PONG.
ready=0
for _ in $(seq 100); do
    if ! kill -0 "$redis_pid" 2>/dev/null; then
        break  # died during startup (e.g. port grabbed by someone else)
    fi
    if [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null || true)" == "PONG" ]]; then
        ready=1
        break
    fi
    sleep 0.1
done
if [[ "$ready" != 1 ]]; then
    echo "with-redis: redis-server did not come up on port $port; its log:" >&2
    cat "$tmp/redis.log" >&2 2>/dev/null || true
    exit 1
fi

export DSPEX_TEST_REDIS_URL="redis://127.0.0.1:$port"
export DSPY_CACHEDIR="$tmp/dspy-cache"

# Run the command as a child we can wait on: bash defers traps while a
# *foreground* command runs, so a SIGTERM sent to this script (e.g. a CI timeout)
# would otherwise neither reach the command nor stop redis until it finished.
# `trap - INT QUIT` undoes bash's ignore-SIGINT for background jobs, so Ctrl-C
# (delivered by the terminal to the whole process group) still reaches it.
( trap - INT QUIT; exec "$@" ) &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM
trap ':' INT  # the child already got the terminal's SIGINT; let it wind down

set +e
wait "$child"
status=$?
# `wait` returns early (status > 128) when a trapped signal arrives; keep
# waiting until the child has really exited.
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    status=$?
done
set -e
exit "$status"
