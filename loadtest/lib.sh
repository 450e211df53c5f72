# shellcheck shell=bash
# What the load scripts (bench.sh, soak.sh, smoke.sh) share: their messages, where the release
# binaries are, processes started in the background and stopped on exit whatever the exit path,
# free ports, waiting for a server to answer, and readings from /proc.
#
# Source it with $here set to this folder and $say_prefix to the tag of the script's messages
# ([bench], [soak], ...). It sets $root (the repository) and $release (the release binaries of
# CARGO_TARGET_DIR, or of target/), and defines functions only: nothing starts, no trap is set,
# until the script calls open_work_dir.

root=$(dirname "${here:?set here before sourcing lib.sh}")
# shellcheck disable=SC2034 # read by the scripts that source this file
release="${CARGO_TARGET_DIR:-$root/target}/release"
: "${say_prefix:?set say_prefix before sourcing lib.sh}"

say() { printf '[%s] %s\n' "$say_prefix" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Dies with MESSAGE unless every value after it is a whole number.
require_whole_numbers() {
  local message=$1 number
  shift
  for number in "$@"; do
    [[ $number =~ ^[0-9]+$ ]] || die "$message"
  done
}

# ---------------------------------------------------------------------------------------------
# Processes: a fresh work directory in $work, and every process started with start_logged
# stopped when the script exits. The directory is removed then, unless the environment variable
# named KEEP_VARIABLE is 1.
open_work_dir() {
  local prefix=$1
  keep_variable=$2
  work=$(mktemp -d "${TMPDIR:-/tmp}/$prefix.XXXXXX")
  started_pids=()
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# Every process is sent SIGTERM first, so that they all wind down at once rather than one
# grace period after the other.
cleanup() {
  local pid
  for pid in "${started_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${started_pids[@]}"; do
    stop_pid "$pid"
  done
  if [[ ${!keep_variable:-0} == 1 ]]; then
    say "work files kept in $work"
  else
    rm -rf "$work"
  fi
}

# Stops one process: SIGTERM, up to 3 s to exit, then SIGKILL.
stop_pid() {
  local pid=$1 waited=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null && ((waited < 30)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# Drops a pid stopped already: a later signal to it could reach another process given that pid.
forget_pid() {
  local pid=$1 kept=() other
  for other in "${started_pids[@]}"; do
    [[ $other == "$pid" ]] || kept+=("$other")
  done
  started_pids=("${kept[@]}")
}

# Starts a command in the background with its output in LOG and no input; sets $last_pid. It is
# stopped on exit.
start_logged() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 </dev/null &
  last_pid=$!
  started_pids+=("$last_pid")
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------------------------------------
# Readiness

# Runs a check every 0.1 s, for up to $wait_seconds (default 15) seconds, until it succeeds;
# gives up at once when PID exits, since a server that died will never answer.
wait_until() {
  local pid=$1 tries=0
  shift
  while ((tries < ${wait_seconds:-15} * 10)); do
    kill -0 "$pid" 2>/dev/null || return 1
    "$@" && return 0
    sleep 0.1
    tries=$((tries + 1))
  done
  return 1
}

# Status code of one request (extra curl arguments after the URL).
status_of() {
  local url=$1
  shift
  curl -s -o /dev/null --max-time 2 -w '%{http_code}' "$@" "$url" 2>/dev/null || true
}

answers_status() { [[ $(status_of "$2") == "$1" ]]; }

# Waits until URL answers STATUS, as long as PID runs.
wait_status() {
  local url=$1 pid=$2 want=$3
  wait_until "$pid" answers_status "$want" "$url"
}

# The echo upstream's benchmark body; curl arguments (a header) may follow the URL.
answers_hello() {
  local url=$1 body
  shift
  body=$(curl -s --max-time 1 "$@" "$url" 2>/dev/null || true)
  # The plain benchmark body, or the JSON one of `echo-upstream --json-bytes`.
  [[ $body == "hello, world" || $body == '{"id":12345,'* ]]
}

# Waits until URL answers 200 with one of the echo upstream's benchmark bodies, as long as PID
# runs; the optional third argument is a request header ("name: value") to send.
wait_ready() {
  local url=$1 pid=$2 header=${3:-}
  local header_args=()
  [[ -n $header ]] && header_args=(-H "$header")
  wait_until "$pid" answers_hello "$url" "${header_args[@]}"
}

# ---------------------------------------------------------------------------------------------
# /proc

# A KiB figure of /proc/PID/status (VmRSS, VmHWM, ...), or nothing when the process is gone.
proc_status_kib() {
  awk -v field="$2:" '$1 == field {print $2}' "/proc/$1/status" 2>/dev/null || true
}
