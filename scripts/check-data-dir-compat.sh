#!/usr/bin/env bash
# Checks that a data directory written by one build of bbx opens unchanged with
# another: the old build creates an agent (with labels), a state key, a keyed
# `state.incr`, a tenant key and an agent quota; the new build must read them all
# back, answer the key's resubmission with the same op, and accept the tenant key.
#
#   scripts/check-data-dir-compat.sh OLD_BBX NEW_BBX
#
# Build the old one from its commit in a target directory of its own (two
# checkouts must not share one: cargo would reuse one's crates for the other).
set -euo pipefail
old=$1 new=$2
dir=$(mktemp -d) port=$((20000 + RANDOM % 20000))
url=http://127.0.0.1:$port
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT

start() {
  "$1" serve --data-dir "$dir/data" --listen "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf "$url/readyz" >/dev/null && return; sleep 0.1; done
  echo "$1 did not become ready: $(tail -1 "$dir/serve.log")" >&2
  exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
call() { curl -sf -H "Authorization: Bearer $key" -H 'content-type: application/json' "$@"; }
field() { python3 -c "import json,sys; print(eval('json.load(sys.stdin)' + sys.argv[1]))" "$1"; }

start "$old"
key=$(cat "$dir/data/admin.key")
agent=$(call -d '{"name":"old","labels":{"team":"x"}}' "$url/v1/agents" | field '["id"]')
call -X PUT -d '{"value":{"n":1}}' "$url/v1/agents/$agent/state/plan" >/dev/null
incr="{\"ops\":[{\"agent\":\"$agent\",\"kind\":\"state.incr\",\"args\":{\"key\":\"c\",\"by\":2},\"idempotency_key\":\"k1\"}]}"
op=$(call -d "$incr" "$url/v1/ops" | field '["ops"][0]["op_id"]')
call "$url/v1/ops/$op/wait?timeout_ms=10000" >/dev/null
tenant_key=$(call -d '{"name":"t","tenant":"acme"}' "$url/v1/keys" | field '["key"]')
call -X PATCH -d '{"pids":17}' "$url/v1/quotas/agents/$agent" >/dev/null
stop

start "$new"
check() { [ "$2" = "$3" ] || { echo "$1: expected $3, found $2" >&2; exit 1; }; }
check agent "$(call "$url/v1/agents/$agent" | field '["labels"]["team"]')" x
check state "$(call "$url/v1/agents/$agent/state/plan" | field '["value"]["n"]')" 1
check op "$(call "$url/v1/ops/$op" | field '["completion"]["status"]')" ok
check "resubmitted key" "$(call -d "$incr" "$url/v1/ops" | field '["ops"][0]["op_id"]')" "$op"
check counter "$(call "$url/v1/agents/$agent/state/c" | field '["value"]')" 2
check quota "$(call "$url/v1/quotas/agents/$agent" | field '["limits"]["pids"]')" 17
check "tenant key" "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $tenant_key" "$url/v1/agents")" 200
stop
echo "a data directory written by $old opens unchanged with $new"
