#!/usr/bin/env bash
# Soak test (`make soak`): one release Gatehouse in front of the echo upstream under mixed load
# for SOAK_SECONDS, with its resident memory, open file descriptors and upstream connections
# sampled every SOAK_INTERVAL seconds. Prints the series and a verdict, and exits 1 unless the
# verdict is FLAT:
#   - RSS: the median of the last third of the samples (after the warm-up) is less than
#     SOAK_RSS_GROWTH_PCT % above the median of the first third;
#   - open fds and established upstream connections: the median of the last third is at most
#     SOAK_FD_SLACK above the largest value of the first third;
#   - Gatehouse is still running, and no wrk saw a socket error (connect, read, write, timeout)
#     or an unexpected status: every answer is 2xx, except the 429s of the rate-limited route.
#
# The load: four wrk processes at once, each with SOAK_CONNECTIONS connections, running the
# scenarios of loadtest/scenarios/:
#   plain.lua                 GET  /plain/          route with no filters
#   post-json.lua             POST /plain/orders    1 KB JSON body, same route
#   jwt-rs256.lua             GET  /jwt/            jwt filter (RS256), auth: required
#   rate-limit-consumers.lua  GET  /limited/        rate_limit (local) keyed by x-consumer, 16
#                                                   consumers, most requests over their limit
#
# Environment:
#   SOAK_SECONDS        load duration (default 600)
#   SOAK_INTERVAL       seconds between samples (default 10)
#   SOAK_WARMUP         seconds of samples left out of the verdict (default: a fifth of
#                       SOAK_SECONDS, at most 60)
#   SOAK_CONNECTIONS    connections of each wrk (default 8)
#   SOAK_THREADS        Gatehouse worker threads (default 2)
#   SOAK_RSS_GROWTH_PCT allowed RSS growth, in % (default 10)
#   SOAK_FD_SLACK       allowed growth of fds and of upstream connections (default 8)
#   SOAK_NO_BUILD=1     use the release binaries already in target/release
#   SOAK_KEEP_WORKDIR=1 keep the config, logs and wrk outputs
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say_prefix=soak
# shellcheck source=lib.sh
source "$here/lib.sh"
cd "$root"

seconds=${SOAK_SECONDS:-600}
interval=${SOAK_INTERVAL:-10}
connections=${SOAK_CONNECTIONS:-8}
threads=${SOAK_THREADS:-2}
rss_growth_pct=${SOAK_RSS_GROWTH_PCT:-10}
fd_slack=${SOAK_FD_SLACK:-8}

require_whole_numbers "SOAK_SECONDS, SOAK_INTERVAL, SOAK_CONNECTIONS, SOAK_THREADS, SOAK_RSS_GROWTH_PCT and SOAK_FD_SLACK must be whole numbers" \
  "$seconds" "$interval" "$connections" "$threads" "$rss_growth_pct" "$fd_slack"
((seconds >= 3 * interval)) || die "SOAK_SECONDS must be at least three SOAK_INTERVALs"
((interval >= 1 && connections >= 1 && threads >= 1)) || die "SOAK_INTERVAL, SOAK_CONNECTIONS and SOAK_THREADS must be at least 1"
default_warmup=$((seconds / 5))
((default_warmup > 60)) && default_warmup=60
warmup=${SOAK_WARMUP:-$default_warmup}
require_whole_numbers "SOAK_WARMUP must be a whole number" "$warmup"

for tool in wrk curl openssl ss python3; do
  command -v "$tool" >/dev/null || die "$tool is required (apt-get install wrk curl openssl iproute2 python3)"
done

if [[ ${SOAK_NO_BUILD:-0} != 1 ]]; then
  say "building release binaries"
  cargo build --release -q --bin gatehouse -p gatehouse --bin echo-upstream -p gatehouse-loadtest ||
    die "the release binaries do not build"
fi
gatehouse_bin="$release/gatehouse"
echo_bin="$release/echo-upstream"
[[ -x $gatehouse_bin ]] || die "$gatehouse_bin is missing (build it or unset SOAK_NO_BUILD)"
[[ -x $echo_bin ]] || die "$echo_bin is missing (build it or unset SOAK_NO_BUILD)"

# ---------------------------------------------------------------------------------------------
# Processes: everything started is stopped on exit, whatever the exit path.
open_work_dir gatehouse-soak SOAK_KEEP_WORKDIR

# ---------------------------------------------------------------------------------------------
# Upstream, credentials, Gatehouse
echo_port=$(free_port)
start_logged "$work/echo.log" "$echo_bin" --listen "127.0.0.1:$echo_port" --name soak
echo_pid=$last_pid
wait_status "http://127.0.0.1:$echo_port/healthz" "$echo_pid" 200 || die "the echo upstream did not start: $(cat "$work/echo.log")"

keys_dir="$root/tests/support/keys"
jwt=$("$here/mint-jwt.sh" RS256 "$keys_dir/rsa1.pk8.pem" k1 soak $((seconds + 86400))) ||
  die "could not sign the soak token with $keys_dir/rsa1.pk8.pem"

port=$(free_port)
ops_port=$(free_port)
cat >"$work/gatehouse.yaml" <<EOF
version: 1
server:
  listeners: [{ name: public, address: "127.0.0.1:$port" }]
  threads: $threads
ops: { address: "127.0.0.1:$ops_port" }
upstreams:
  - name: echo
    targets: [{ address: "127.0.0.1:$echo_port" }]
routes:
  - name: jwt
    match: { paths: [{ prefix: /jwt }] }
    upstream: echo
    auth: required
    filters:
      - kind: jwt
        config: { algorithms: [RS256], keys: [{ kid: k1, algorithm: RS256, public_key: "\${file:$keys_dir/rsa1.pub}" }] }
  - name: limited
    match: { paths: [{ prefix: /limited }] }
    upstream: echo
    filters:
      - kind: rate_limit
        config: { policies: [{ name: per-consumer, key: [{ header: x-consumer }], capacity: 50, refill: { tokens: 50, every: 1s } }] }
  - name: plain
    match: { paths: [{ prefix: / }] }
    upstream: echo
EOF
start_logged "$work/gatehouse.log" "$gatehouse_bin" run -c "$work/gatehouse.yaml"
gatehouse_pid=$last_pid
base="http://127.0.0.1:$port"
if ! wait_status "$base/plain/" "$gatehouse_pid" 200; then
  tail -n 20 "$work/gatehouse.log" >&2 || true
  die "Gatehouse did not start or does not proxy to the echo upstream (its log is above)"
fi
[[ $(status_of "$base/jwt/") == 401 ]] || die "the jwt route lets a request without a token through"
[[ $(status_of "$base/jwt/" -H "authorization: Bearer $jwt") == 200 ]] || die "the jwt route refuses the soak token"
curl -s -D - -o /dev/null --max-time 2 -H 'x-consumer: probe' "$base/limited/" | tr -d '\r' |
  grep -qi '^ratelimit-policy:' || die "the limited route answers without RateLimit headers"

# ---------------------------------------------------------------------------------------------
# Load and samples
scenarios="$here/scenarios"
start_wrk() {
  local name=$1 script=$2 path=$3
  start_logged "$work/wrk-$name.txt" env BENCH_JWT_RS256="$jwt" BENCH_CONSUMERS=16 \
    wrk -t1 -c"$connections" -d"${seconds}s" -s "$scenarios/$script" "$base$path"
  wrk_pids+=("$last_pid")
}
wrk_pids=()
start_wrk plain plain.lua /plain/
start_wrk post post-json.lua /plain/orders
start_wrk jwt jwt-rs256.lua /jwt/
start_wrk limited rate-limit-consumers.lua /limited/
say "Gatehouse pid $gatehouse_pid on :$port (upstream :$echo_port), ${seconds}s of load from 4 wrk x ${connections} connections, a sample every ${interval}s (first ${warmup}s are warm-up)"

samples="$work/samples.tsv"
: >"$samples"
sample() {
  local elapsed=$1 phase=$2 rss fds upstream clients
  rss=$(proc_status_kib "$gatehouse_pid" VmRSS)
  fds=$(find "/proc/$gatehouse_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  upstream=$(ss -Htn state established "( dport = :$echo_port )" 2>/dev/null | wc -l)
  clients=$(ss -Htn state established "( sport = :$port )" 2>/dev/null | wc -l)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$elapsed" "$phase" "${rss:-0}" "$fds" "$upstream" "$clients" >>"$samples"
  printf '[soak] t=%4ss %-7s rss %7s KiB  fds %4s  upstream conns %3s  client conns %3s\n' \
    "$elapsed" "$phase" "${rss:-?}" "$fds" "$upstream" "$clients" >&2
}

any_wrk_running() {
  local pid
  for pid in "${wrk_pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && return 0
  done
  return 1
}

started=$(date +%s)
gatehouse_died=0
next=0
while :; do
  now=$(date +%s)
  elapsed=$((now - started))
  if ! kill -0 "$gatehouse_pid" 2>/dev/null; then
    gatehouse_died=1
    say "Gatehouse exited during the soak; last lines of its log:"
    tail -n 20 "$work/gatehouse.log" >&2 || true
    break
  fi
  if ((elapsed >= next)); then
    if ((elapsed > seconds)); then
      break
    fi
    if ((elapsed < warmup)); then sample "$elapsed" warm-up; else sample "$elapsed" load; fi
    next=$((next + interval))
  fi
  any_wrk_running || break
  # wrk stops itself after SOAK_SECONDS; 30 s more means it is stuck.
  ((elapsed > seconds + 30)) && { say "wrk did not stop on time"; break; }
  sleep 0.5
done
for pid in "${wrk_pids[@]}"; do
  # Without Gatehouse the rest of the load only counts connection errors.
  ((gatehouse_died == 1)) && kill -TERM "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
done
# Once the load stops, idle client and upstream connections should go: one sample after a pause.
if ((gatehouse_died == 0)); then
  sleep 2
  if kill -0 "$gatehouse_pid" 2>/dev/null; then
    sample "$(($(date +%s) - started))" idle
  else
    gatehouse_died=1
  fi
fi

# ---------------------------------------------------------------------------------------------
# Verdict
python3 - "$samples" "$work" "$rss_growth_pct" "$fd_slack" "$gatehouse_died" <<'PY'
import re
import statistics
import sys

samples_path, work, rss_growth_pct, fd_slack, died = sys.argv[1:]
rss_growth_pct, fd_slack, died = float(rss_growth_pct), int(fd_slack), died == "1"

rows = []
with open(samples_path, encoding="utf-8") as handle:
    for line in handle:
        elapsed, phase, rss, fds, upstream, clients = line.rstrip("\n").split("\t")
        rows.append({"t": int(elapsed), "phase": phase, "rss": int(rss), "fds": int(fds),
                     "upstream": int(upstream), "clients": int(clients)})

print()
print("  time  phase      RSS MiB   open fds   upstream conns   client conns")
for row in rows:
    print(f"{row['t']:5d}s  {row['phase']:<8} {row['rss'] / 1024:9.1f}   {row['fds']:8d}   "
          f"{row['upstream']:14d}   {row['clients']:12d}")
print()

problems = []
if died:
    problems.append("Gatehouse exited during the soak")

measured = [row for row in rows if row["phase"] == "load"]
if len(measured) < 3:
    problems.append(f"{len(measured)} sample(s) after the warm-up; the verdict needs at least 3 "
                    "(raise SOAK_SECONDS or lower SOAK_INTERVAL / SOAK_WARMUP)")
else:
    third = max(1, len(measured) // 3)
    first, last = measured[:third], measured[-third:]
    rss_first = statistics.median(row["rss"] for row in first)
    rss_last = statistics.median(row["rss"] for row in last)
    growth = (rss_last - rss_first) / rss_first * 100 if rss_first else 0.0
    print(f"RSS: median {rss_first / 1024:.1f} MiB in the first third, {rss_last / 1024:.1f} MiB in the "
          f"last third: {growth:+.1f} % (limit +{rss_growth_pct:g} %)")
    if growth >= rss_growth_pct:
        problems.append(f"RSS grew {growth:.1f} %")
    for key, label in (("fds", "open fds"), ("upstream", "upstream connections")):
        first_max = max(row[key] for row in first)
        last_median = statistics.median(row[key] for row in last)
        print(f"{label}: at most {first_max} in the first third, median {last_median:g} in the last "
              f"third (slack {fd_slack})")
        if last_median > first_max + fd_slack:
            problems.append(f"{label} grew from at most {first_max} to a median of {last_median:g}")

# wrk's own counts. The rate-limited scenario prints admitted / limited / other; wrk's
# "Non-2xx or 3xx" line there counts the intended 429s, so only "other" is an error.
print()
for name in ("plain", "post", "jwt", "limited"):
    try:
        text = open(f"{work}/wrk-{name}.txt", encoding="utf-8", errors="replace").read()
    except OSError as error:
        problems.append(f"wrk {name}: no output ({error})")
        continue
    requests = re.search(r"^\s*(\d+) requests in", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if not requests:
        problems.append(f"wrk {name} reported nothing: {text.strip()[-300:]}")
        continue
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = sum(int(value) for value in socket.groups()) if socket else 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    non_2xx = int(non_2xx.group(1)) if non_2xx else 0
    line = f"wrk {name:<8} {int(requests.group(1)):>10,} requests, {float(rps.group(1)):>9,.0f} rps"
    if name == "limited":
        counts = re.search(r"rate-limit: admitted (\d+) limited (\d+) other (\d+)", text)
        if not counts:
            problems.append("wrk limited: the scenario printed no admitted/limited counts")
            unexpected = non_2xx
        else:
            admitted, limited, unexpected = (int(value) for value in counts.groups())
            line += f", {admitted:,} admitted, {limited:,} limited (429)"
            if admitted == 0:
                problems.append("wrk limited: no request was admitted")
    else:
        unexpected = non_2xx
    line += f", {unexpected:,} unexpected statuses, {socket_errors:,} socket errors"
    print(line)
    if unexpected:
        problems.append(f"wrk {name}: {unexpected} unexpected statuses")
    if socket_errors:
        problems.append(f"wrk {name}: socket errors ({socket.group(0)})")

print()
if problems:
    print("verdict: NOT FLAT / FAIL")
    for problem in problems:
        print(f"  - {problem}")
    sys.exit(1)
print("verdict: FLAT / PASS (RSS, open fds and upstream connections flat; no errors)")
PY
