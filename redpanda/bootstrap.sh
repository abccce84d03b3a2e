#!/usr/bin/env bash
# Creates what the chat needs on a Redpanda cluster, with rpk; safe to run
# again (what exists is checked, never recreated):
#   - chat.messages: the log, PARTITIONS partitions (16, the chat's
#     --partitions default; rooms are placed by partition count, so an
#     existing topic with another count is an error, never altered),
#     replication REPLICAS (3), infinite retention (the log is the source of
#     truth: retention.ms=-1, retention.bytes=-1);
#   - chat.dlq: the dead-letter topic of the projector, 1 partition (what the
#     chat opens it with), same replication and retention;
#   - chat.ephemeral: presence and typing between gateways, 1 partition,
#     same replication, retention.ms=60000 (nothing in it lasts; the chat
#     uses an existing one as it is);
#   - the Avro schemas in Redpanda's schema registry, subject
#     chat.messages-value: every released version (schemas/avro/history/vN)
#     in order, then the current one, under BACKWARD_TRANSITIVE compatibility
#     (every released version stays readable by the newest, the rule the
#     schemas crate tests). The chat's records use Avro single-object
#     encoding (the schema fingerprint in each record), not the registry's
#     wire format: the registry documents the contract, checks changes to it,
#     and lets Redpanda Console show it.
#
# Usage (in redpanda/compose.yaml it runs as the `bootstrap` service):
#   BROKERS=redpanda:9092 REGISTRY=http://redpanda:8081 SCHEMAS=/schemas/avro \
#     redpanda/bootstrap.sh
set -euo pipefail

BROKERS="${BROKERS:-localhost:19092}"
REGISTRY="${REGISTRY:-http://localhost:18081}"
SCHEMAS="${SCHEMAS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../schemas/avro" && pwd)}"
PARTITIONS="${PARTITIONS:-16}"
REPLICAS="${REPLICAS:-3}"
SUBJECT="chat.messages-value"

rpk() { command rpk "$@" -X brokers="$BROKERS" -X registry.hosts="$REGISTRY"; }

echo "waiting for a healthy cluster at $BROKERS"
rpk cluster health --watch --exit-when-healthy

# ensure_topic NAME PARTITIONS
ensure_topic() {
    local name="$1" partitions="$2" existing
    existing="$(rpk topic list | awk -v t="$name" '$1 == t { print $2 }')"
    if [[ -z "$existing" ]]; then
        rpk topic create "$name" -p "$partitions" -r "$REPLICAS" \
            -c retention.ms=-1 -c retention.bytes=-1 -c cleanup.policy=delete
    elif [[ "$existing" != "$partitions" ]]; then
        echo "topic $name has $existing partitions, expected $partitions:" \
             "rooms would move to other partitions; refusing to continue" >&2
        exit 1
    else
        echo "topic $name exists with $existing partitions"
        rpk topic alter-config "$name" --set retention.ms=-1 --set retention.bytes=-1
    fi
}

ensure_topic chat.messages "$PARTITIONS"
ensure_topic chat.dlq 1
if [[ -z "$(rpk topic list | awk '$1 == "chat.ephemeral" { print $2 }')" ]]; then
    rpk topic create chat.ephemeral -p 1 -r "$REPLICAS" \
        -c retention.ms=60000 -c cleanup.policy=delete
else
    echo "topic chat.ephemeral exists"
fi

rpk registry compatibility-level set "$SUBJECT" --level BACKWARD_TRANSITIVE
for schema in $(ls -d "$SCHEMAS"/history/v*/ | sort -V) "$SCHEMAS/"; do
    # Registering a schema the subject already holds returns its id again.
    rpk registry schema create "$SUBJECT" --schema "${schema%/}/chat_event.avsc" --type avro
done
rpk registry schema list "$SUBJECT"
rpk topic list
echo "bootstrap done"
