#!/usr/bin/env bash
# CI smoke version of the side-by-side benchmark: Gatehouse (plain and full chain) against
# nginx and the bare Pingora proxy, 5 alternating runs of 5 s each, about two minutes
# of load in all. Prints the table. Fails only on a gross regression, Gatehouse / bare Pingora
# under SMOKE_MIN (default 0.7) in median rps, or when Gatehouse or bare Pingora cannot be
# measured at all: the CI machine is shared and noisy, so finer thresholds would flap.
#
# Writes nothing to the git tree: the JSON and chart go to a temporary directory (kept in
# SMOKE_RESULTS_DIR when that is set), and loadtest/RESULTS.md is left alone.
#
# Environment:
#   SMOKE_MIN            lowest acceptable Gatehouse / bare Pingora rps ratio (default 0.7: the
#                        same binaries measured between 0.73 and 1.01 on one noisy machine, so
#                        the floor only catches gross regressions)
#   SMOKE_RESULTS_DIR    keep the JSON and SVG of the run there
#   BENCH_*              passed to bench.sh; the defaults here are BENCH_CONTENDERS=
#                        nginx,bare,gatehouse,gatehouse-full BENCH_SECONDS=5 BENCH_REPS=5
#                        BENCH_WARMUP=1 BENCH_QUIET_WAIT=0 BENCH_NO_INSTALL=1 (a missing nginx
#                        is skipped, not installed). Set BENCH_NO_BUILD=1 when the release
#                        binaries are already built.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say_prefix=smoke
# shellcheck source=lib.sh
source "$here/lib.sh"
minimum=${SMOKE_MIN:-0.7}
[[ $minimum =~ ^[0-9]+(\.[0-9]+)?$ ]] || { say "SMOKE_MIN must be a number"; exit 2; }

# The chart is drawn only when it is kept.
no_chart=1
if [[ -n ${SMOKE_RESULTS_DIR:-} ]]; then
  results=$SMOKE_RESULTS_DIR
  mkdir -p "$results"
  no_chart=0
else
  results=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-smoke.XXXXXX")
  trap 'rm -rf "$results"' EXIT
fi

started=$(date +%s)
BENCH_CONTENDERS=${BENCH_CONTENDERS:-nginx,bare,gatehouse,gatehouse-full} \
  BENCH_SECONDS=${BENCH_SECONDS:-5} \
  BENCH_REPS=${BENCH_REPS:-5} \
  BENCH_WARMUP=${BENCH_WARMUP:-1} \
  BENCH_QUIET_WAIT=${BENCH_QUIET_WAIT:-0} \
  BENCH_NO_INSTALL=${BENCH_NO_INSTALL:-1} \
  BENCH_LATENCY=0 \
  BENCH_NO_APPEND=1 \
  BENCH_NO_CHART=${BENCH_NO_CHART:-$no_chart} \
  BENCH_RESULTS_DIR="$results" \
  "$here/bench.sh"

shopt -s nullglob
json_files=("$results"/*.json)
((${#json_files[@]} > 0)) || { say "bench.sh wrote no results"; exit 1; }
json=${json_files[-1]}

python3 - "$json" "$minimum" "$(($(date +%s) - started))" <<'PY'
import json
import sys

path, minimum, elapsed = sys.argv[1], float(sys.argv[2]), sys.argv[3]
document = json.load(open(path, encoding="utf-8"))
contenders = document.get("contenders", {})
ratios = document.get("ratios", {})
print()
for name in ("gatehouse", "bare"):
    if not contenders.get(name, {}).get("rps_median"):
        reason = document.get("skipped", {}).get(name, "no measurement")
        print(f"[smoke] FAIL: {name} was not measured ({reason})")
        sys.exit(1)
ratio = ratios.get("gatehouse/bare-pingora") or {}
value = ratio.get("rps")
full = (ratios.get("gatehouse-full/gatehouse") or {}).get("rps")
nginx = (ratios.get("gatehouse/nginx") or {}).get("rps")
summary = f"Gatehouse / bare Pingora {value:.2f}"
summary += f", Gatehouse / nginx {nginx:.2f}" if nginx else ", nginx not measured"
summary += f", full chain / plain {full:.2f}" if full else ", full chain not measured"
summary += f" ({elapsed} s)"
if value < minimum:
    print(f"[smoke] FAIL: {summary}; Gatehouse / bare Pingora is under {minimum:g}")
    sys.exit(1)
print(f"[smoke] ok: {summary}")
PY
