#!/usr/bin/env bash
# gRPC through Gatehouse, natively and transcoded: the same unary call (Echo.Say, a short
# message) made by a gRPC client (HTTP/2, application/grpc) and by a REST client (HTTP/2, JSON
# through the grpc_json filter), both with h2load over h2c against one gateway, in front of
# `echo-upstream --grpc` (an HTTP/2 gRPC service that answers with the message it got). Runs
# alternate; the table (median rps of each, and their ratio) is appended to
# loadtest/RESULTS.md. Part of `make bench`.
#
# Environment: BENCH_SECONDS (10), BENCH_REPS (3), BENCH_WARMUP (2), BENCH_CLIENTS (16
# connections), BENCH_STREAMS (4 concurrent streams each), BENCH_PROXY_CPU / BENCH_LOAD_CPU
# (1 / 0), BENCH_NO_BUILD=1, BENCH_NO_APPEND=1, BENCH_KEEP_WORKDIR=1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say_prefix=grpc-bench
# shellcheck source=lib.sh
source "$here/lib.sh"
cd "$root"

seconds=${BENCH_SECONDS:-10}
reps=${BENCH_REPS:-3}
warmup=${BENCH_WARMUP:-2}
clients=${BENCH_CLIENTS:-16}
streams=${BENCH_STREAMS:-4}
proxy_cpu=${BENCH_PROXY_CPU:-1}
load_cpu=${BENCH_LOAD_CPU:-0}
require_whole_numbers "BENCH_SECONDS, BENCH_REPS, BENCH_WARMUP, BENCH_CLIENTS and BENCH_STREAMS must be whole numbers" \
  "$seconds" "$reps" "$warmup" "$clients" "$streams"
((reps >= 1)) || die "BENCH_REPS must be at least 1"
if (($(nproc) < 2)); then
  proxy_cpu=0
  load_cpu=0
fi
command -v h2load >/dev/null || die "h2load is missing (apt-get install nghttp2-client; make bench-deps installs it)"

if [[ -z ${BENCH_NO_BUILD:-} ]]; then
  cargo build --release --bin gatehouse -p gatehouse --bin echo-upstream -p gatehouse-loadtest
fi

open_work_dir gatehouse-grpc-bench BENCH_KEEP_WORKDIR

upstream_port=$(free_port)
gateway_port=$(free_port)
ops_port=$(free_port)
start_logged "$work/upstream.log" taskset -c "$load_cpu" "$release/echo-upstream" --grpc \
  --listen "127.0.0.1:$upstream_port"
upstream_pid=$last_pid

descriptor="$root/conf/grpc/echo.pb"
digest=$(sha256sum "$descriptor" | cut -d' ' -f1)
cat >"$work/gatehouse.yaml" <<YAML
version: 1
server:
  listeners: [{ name: public, address: "127.0.0.1:$gateway_port", h2c: true }]
  threads: 1
ops: { address: "127.0.0.1:$ops_port" }
telemetry: { log: { level: warn } }
upstreams:
  - { name: grpc, protocol: h2, targets: [{ address: "127.0.0.1:$upstream_port" }] }
routes:
  - name: native
    match: { paths: [{ prefix: /gatehouse.example.Echo/ }] }
    upstream: grpc
  - name: rest
    match: { paths: [{ prefix: /v1/ }] }
    upstream: grpc
    filters:
      - kind: grpc_json
        config: { descriptor: "$descriptor", sha256: "$digest" }
YAML
start_logged "$work/gatehouse.log" taskset -c "$proxy_cpu" "$release/gatehouse" run -c "$work/gatehouse.yaml"
gateway_pid=$last_pid
wait_status "http://127.0.0.1:$ops_port/readyz" "$gateway_pid" 200 || die "gatehouse did not become ready: $(tail -n 5 "$work/gatehouse.log")"

# The same SayRequest {text: "hello", count: 1}: a gRPC frame, and JSON.
printf '\x00\x00\x00\x00\x09\x0a\x05hello\x10\x01' >"$work/say.bin"
printf '{"text":"hello","count":"1"}' >"$work/say.json"
native=(-H 'content-type: application/grpc' -H 'te: trailers' -d "$work/say.bin"
  "http://127.0.0.1:$gateway_port/gatehouse.example.Echo/Say")
rest=(-H 'content-type: application/json' -d "$work/say.json" "http://127.0.0.1:$gateway_port/v1/say")

# Each way answers as it should before it is measured.
reply=$(curl -s --http2-prior-knowledge --max-time 5 -H 'content-type: application/json' \
  --data-binary @"$work/say.json" "http://127.0.0.1:$gateway_port/v1/say")
[[ $reply == '{"text":"hello","count":"1"}' ]] || die "the transcoded call answered: $reply"
status=$(curl -s --http2-prior-knowledge --max-time 5 -o /dev/null -w '%{http_code}' \
  -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @"$work/say.bin" \
  "http://127.0.0.1:$gateway_port/gatehouse.example.Echo/Say")
[[ $status == 200 ]] || die "the native call answered $status"

# One h2load run; prints its rps, or fails when any request did not succeed.
run() {
  local name=$1 output
  shift
  output="$work/h2load-$name-$RANDOM.txt"
  taskset -c "$load_cpu" h2load -c "$clients" -m "$streams" -D "$seconds" --warm-up-time "$warmup" \
    "$@" >"$output" 2>&1 || die "h2load failed: $(tail -n 3 "$output")"
  local failed
  failed=$(awk '/^requests:/ {for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^failed/) print $i}' "$output")
  [[ ${failed:-1} == 0 ]] || die "$name: $failed requests failed: $(grep -E '^(requests|status codes)' "$output")"
  awk '/^finished in/ {gsub(",", "", $4); print $4}' "$output"
}

declare -a native_rps=() rest_rps=()
for ((rep = 1; rep <= reps; rep++)); do
  if ((rep % 2)); then
    native_rps+=("$(run native "${native[@]}")")
    rest_rps+=("$(run rest "${rest[@]}")")
  else
    rest_rps+=("$(run rest "${rest[@]}")")
    native_rps+=("$(run native "${native[@]}")")
  fi
  say "round $rep: native ${native_rps[-1]} rps, transcoded ${rest_rps[-1]} rps"
done

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
native_median=$(median "${native_rps[@]}")
rest_median=$(median "${rest_rps[@]}")
ratio=$(awk -v a="$rest_median" -v b="$native_median" 'BEGIN {printf "%.3f", a / b}')
stop_pid "$gateway_pid"
stop_pid "$upstream_pid"

table=$(
  cat <<TABLE

### gRPC: transcoded against native, $(date -u +%Y-%m-%d) ($(git rev-parse --short HEAD 2>/dev/null || echo unknown))

\`loadtest/grpc-bench.sh\`: Echo.Say through one Gatehouse (1 thread, core $proxy_cpu) to
\`echo-upstream --grpc\` (core $load_cpu, with h2load: $clients connections x $streams streams, h2c,
${seconds} s per run after ${warmup} s of warm-up, $reps runs each, alternating). Median rps.

| call | median rps | runs |
|---|---:|---|
| native gRPC (\`application/grpc\`) | ${native_median} | ${native_rps[*]} |
| transcoded (\`grpc_json\`, JSON in and out) | ${rest_median} | ${rest_rps[*]} |

Transcoded / native: **${ratio}**.
TABLE
)
printf '%s\n' "$table"
if [[ -z ${BENCH_NO_APPEND:-} ]]; then
  printf '%s\n' "$table" >>"$here/RESULTS.md"
  say "appended to loadtest/RESULTS.md"
fi
