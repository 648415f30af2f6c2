#!/usr/bin/env sh
# The relay's three routes with curl. Usage: RELAY=http://localhost:8080 KEY=user:password sh examples/curl.sh
set -eu
RELAY="${RELAY:-http://localhost:8080}"
KEY="${KEY:?set KEY to username:password}"

echo "--- health (no credentials)"
curl -fsS "$RELAY/health"; echo

echo "--- models"
curl -fsS "$RELAY/v1/models" -H "Authorization: Bearer $KEY"; echo

echo "--- chat"
curl -fsS "$RELAY/v1/chat/completions" \
  -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'; echo

echo "--- streamed chat (-N: print chunks as they arrive)"
curl -fsSN "$RELAY/v1/chat/completions" \
  -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Count to five"}]}'

echo "--- Basic auth works too"
curl -fsS "$RELAY/v1/models" -u "$KEY"; echo
