#!/usr/bin/env bash
# Container healthcheck for images without curl or wget (Debezium Connect, HAPI FHIR): exit 0 when
# GET http://HOST:PORT/PATH answers with a 2xx status. Plain bash (/dev/tcp), HTTP/1.0.
#   http-ok.sh HOST PORT PATH        e.g. http-ok.sh localhost 8083 /connectors
set -euo pipefail
host="${1:?usage: http-ok.sh HOST PORT PATH}"
port="${2:?usage: http-ok.sh HOST PORT PATH}"
path="${3:-/}"
exec 3<>"/dev/tcp/$host/$port"
printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&3
read -r -t 10 _version status _reason <&3 || { echo "no HTTP answer from $host:$port" >&2; exit 1; }
if [[ "$status" =~ ^2[0-9][0-9]$ ]]; then exit 0; fi
echo "GET $path on $host:$port answered $status" >&2
exit 1
