#!/usr/bin/env bash
# Protect raw 16-bit little-endian PCM through the cloak.v1 contract from the shell: grpcurl (or `buf curl`) and jq,
# nothing else. The wire recipe of docs/contract.md as a script.
#
#   protect_raw.sh HOST:PORT RATE CHANNELS IN.raw OUT.raw ['{"seed": 1}']
#
# IN.raw: interleaved int16 frames (make one from any file with
#   ffmpeg -i take.wav -f s16le -ar 48000 -ac 2 take.raw). OUT.raw: the protected PCM, same layout.
# Environment: CLOAK_TOKEN (a bearer token, when the server has --tokens-file), CLOAK_CURL=grpcurl|buf (default:
# grpcurl when installed, else buf). Plaintext only; see docs/contract.md for TLS.
set -euo pipefail
if [ $# -lt 5 ]; then sed -n '2,10p' "$0" >&2; exit 2; fi
target=$1 rate=$2 channels=$3 input=$4 output=$5 settings=${6:-"{}"}
client=${CLOAK_CURL:-$(command -v grpcurl >/dev/null 2>&1 && echo grpcurl || echo buf)}
bytes=$(stat -c %s "$input")
if [ $((bytes % (2 * channels))) -ne 0 ]; then
    echo "$input: $bytes bytes is not a whole number of $channels-channel int16 frames" >&2; exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
split -b 1048576 "$input" "$work/chunk."          # messages of at most 1 MiB of PCM (the server takes 4 MiB)
{
    printf '{"header": {"sample_rate": %d, "channels": %d, "frames": %d, "encoding": "SAMPLE_ENCODING_INT16",' \
        "$rate" "$channels" $((bytes / (2 * channels)))
    printf ' "sha256": "%s", "settings": %s}}\n' "$(sha256sum "$input" | cut -c1-64)" "$settings"
    for f in "$work"/chunk.*; do printf '{"pcm": "%s"}\n' "$(base64 -w0 "$f")"; done
} > "$work/request.json"
auth=()
if [ -n "${CLOAK_TOKEN:-}" ]; then auth=(-H "authorization: Bearer $CLOAK_TOKEN"); fi
case $client in
    grpcurl) grpcurl -plaintext -max-time 3600 "${auth[@]}" -d @ "$target" cloak.v1.CloakService/Protect \
                 < "$work/request.json" > "$work/events.json" ;;
    buf) buf curl --protocol grpc --http2-prior-knowledge "${auth[@]}" -d @- \
             "http://$target/cloak.v1.CloakService/Protect" < "$work/request.json" > "$work/events.json" ;;
    *) echo "CLOAK_CURL must be grpcurl or buf, got $client" >&2; exit 2 ;;
esac
jq -r 'select(.event.resultChunk) | .event.resultChunk.pcm' "$work/events.json" | base64 -d > "$work/out.raw"
want=$(jq -r 'select(.event.done) | .event.done.sha256' "$work/events.json")
got=$(sha256sum "$work/out.raw" | cut -c1-64)
if [ -z "$want" ] || [ "$want" != "$got" ]; then
    echo "the result does not match the server's sha256 (${want:-no done event} vs $got)" >&2; exit 1
fi
mv "$work/out.raw" "$output"
jq -c 'select(.event.done) | .event.done.metrics | {snrDb, linf}' "$work/events.json"
