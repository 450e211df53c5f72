#!/usr/bin/env python3
"""Turns the raw measurements of one bench.sh run into its JSON result and its markdown table.

    python3 loadtest/report.py RUNS LATENCY INSTRUCTIONS SKIPPED VERSIONS JSON_OUT MARKDOWN_OUT \\
        STAMP SECONDS REPS CONNECTIONS WARMUP PROXY_CPU LOAD_CPU LATENCY_RPS LATENCY_SECONDS

Reads five tab-separated files that bench.sh writes in its work directory, and the files they
name:
    RUNS      one line per measured wrk run: contender, rep, path of wrk's output, peak RSS KiB,
              proxy CPU %, upstream CPU %, whole-machine CPU %, wrk CPU %
    LATENCY   one line per open-loop oha run: contender, mode (fixed, half, or half:OTHER for
              direct at OTHER's half rate), rate, path of oha's JSON output (may be empty)
    INSTRUCTIONS  one line per callgrind count: contender, warm-up requests, counted requests,
              instructions; or "note", why a contender has no count (may be empty)
    SKIPPED   contender, why it was not measured
    VERSIONS  key, value: tool versions, commit, kernel, CPU, cores, load average
The remaining arguments describe the method (STAMP is the run's date, the rest are bench.sh's
settings) and go into both outputs as they are.

Writes JSON_OUT (every run, medians, ratios, resources, environment: the file chart.py draws)
and MARKDOWN_OUT (the tables that bench.sh prints and appends to loadtest/RESULTS.md).
Standard library only.
"""

import json
import re
import statistics
import sys

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}
ORDER = ["direct", "nginx", "haproxy", "envoy", "bare", "gatehouse", "gatehouse-xff", "gatehouse-baseline",
         "gatehouse-jwt", "gatehouse-apikey", "gatehouse-full", "gatehouse-full-baseline",
         "gatehouse-rl-local", "gatehouse-rl-redis", "gatehouse-rl-lease", "gatehouse-resilient",
         "gatehouse-headers", "gatehouse-json-plain", "gatehouse-json",
         "gatehouse-traced", "gatehouse-traced-all", "gatehouse-traced-blackholed",
         "gatehouse-rr-slow", "gatehouse-ewma-slow", "gatehouse-lb", "gatehouse-lb-proxyv2",
         "gatehouse-wasm-native", "gatehouse-wasm"]
LABELS = {
    "direct": "direct to upstream",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "envoy": "Envoy",
    "bare": "bare Pingora",
    "gatehouse": "Gatehouse",
    "gatehouse-xff": "Gatehouse, only X-Forwarded-For written",
    "gatehouse-baseline": "Gatehouse, baseline binary",
    "gatehouse-jwt": "Gatehouse + jwt (RS256)",
    "gatehouse-apikey": "Gatehouse + api_key",
    "gatehouse-full": "Gatehouse full chain (jwt + rate_limit + 3 header ops)",
    "gatehouse-full-baseline": "Gatehouse full chain, baseline binary",
    "gatehouse-rl-local": "Gatehouse + rate_limit (local)",
    "gatehouse-rl-redis": "Gatehouse + rate_limit (redis)",
    "gatehouse-rl-lease": "Gatehouse + rate_limit (redis, lease)",
    "gatehouse-resilient": "Gatehouse + health check, outlier detection, breaker",
    "gatehouse-headers": "Gatehouse + headers (3 request, 3 response operations)",
    "gatehouse-json-plain": "Gatehouse, 1 KiB JSON responses",
    "gatehouse-json": "Gatehouse + json_body (one set on each 1 KiB JSON response)",
    "gatehouse-traced": "Gatehouse + tracing at 1 % + access log",
    "gatehouse-traced-all": "Gatehouse + tracing at 100 %",
    "gatehouse-traced-blackholed": "Gatehouse + tracing at 100 %, collector never answers",
    "gatehouse-rr-slow": "Gatehouse, 2 targets (one 5 ms slower), round robin",
    "gatehouse-ewma-slow": "Gatehouse, 2 targets (one 5 ms slower), peak EWMA",
    "gatehouse-lb": "Gatehouse behind HAProxy mode tcp",
    "gatehouse-lb-proxyv2": "Gatehouse behind HAProxy mode tcp, PROXY v2 (crc32c, unique-id)",
    "gatehouse-wasm-native": "Gatehouse + headers (add one request, one response header)",
    "gatehouse-wasm": "Gatehouse + wasm add_header plugin (the same two operations)",
}
# The same route with and without its filters, in the same run: the price of the filters.
VARIANTS = ["gatehouse-xff", "gatehouse-jwt", "gatehouse-apikey", "gatehouse-full", "gatehouse-rl-local",
            "gatehouse-rl-redis", "gatehouse-rl-lease", "gatehouse-resilient", "gatehouse-headers",
            "gatehouse-traced", "gatehouse-traced-all", "gatehouse-traced-blackholed"]
# Two balancers over the same targets, one slower: peak EWMA against round robin.
# The same route in front of the same JSON upstream, with and without a body rewrite.
# The same listener behind the same L4 balancer, with and without PROXY protocol v2.
# The same two header operations by a wasm plugin and by the native headers filter.
PAIRS = {"gatehouse-ewma-slow": "gatehouse-rr-slow", "gatehouse-json": "gatehouse-json-plain",
         "gatehouse-lb-proxyv2": "gatehouse-lb", "gatehouse-wasm": "gatehouse-wasm-native"}
# The same config on this tree's binary and on an older one (BENCH_BASELINE_DIR), in the same
# rounds: what the change between the two builds did to the plain route and to the full chain.
BASELINES = {"gatehouse": "gatehouse-baseline", "gatehouse-full": "gatehouse-full-baseline"}
ARGUMENTS = ("RUNS LATENCY INSTRUCTIONS SKIPPED VERSIONS JSON_OUT MARKDOWN_OUT STAMP SECONDS REPS CONNECTIONS "
             "WARMUP PROXY_CPU LOAD_CPU LATENCY_RPS LATENCY_SECONDS")


def to_ms(text):
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    return round(float(match.group(1)) * UNITS[match.group(2)], 3) if match else None


def parse_wrk(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    result = {"rps": None, "p50_ms": None, "p99_ms": None, "requests": None,
              "non_2xx": 0, "socket_errors": 0}
    match = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if match:
        result["rps"] = float(match.group(1))
    for percent, key in (("50", "p50_ms"), ("99", "p99_ms")):
        match = re.search(rf"^\s+{percent}%\s+(\S+)", text, re.M)
        if match:
            result[key] = to_ms(match.group(1))
    match = re.search(r"^\s*(\d+) requests in", text, re.M)
    if match:
        result["requests"] = int(match.group(1))
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if match:
        result["non_2xx"] = int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match:
        result["socket_errors"] = sum(int(value) for value in match.groups())
    return result


def median(values):
    values = [value for value in values if value is not None]
    return round(statistics.median(values), 3) if values else None


def lines(path, columns=2):
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n").split("\t", columns - 1) for line in handle if line.strip()]


def seconds_to_ms(value):
    return round(value * 1000, 3) if isinstance(value, (int, float)) else None


def cell(value, digits=0):
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def read_runs(runs_path):
    """Every wrk run of every contender, in the order measured: runs[name] = [run, ...]."""
    runs = {}
    for name, rep, wrk_path, rss_kib, cpu, upstream_cpu, machine_cpu, wrk_cpu in lines(runs_path, 8):
        run = parse_wrk(wrk_path)
        run.update(rep=int(rep), peak_rss_kib=int(rss_kib), cpu_pct=float(cpu),
                   upstream_cpu_pct=float(upstream_cpu), machine_cpu_pct=float(machine_cpu),
                   wrk_cpu_pct=float(wrk_cpu))
        # What neither the proxy, the upstream nor wrk used: other work that competed for the cores.
        ours = run["cpu_pct"] + run["wrk_cpu_pct"] + (0 if name == "direct" else run["upstream_cpu_pct"])
        run["other_cpu_pct"] = round(max(0.0, run["machine_cpu_pct"] - ours), 1)
        runs.setdefault(name, []).append(run)
    return runs


def read_latency(latency_path):
    """latency[name][mode]: mode is "fixed" (latency_rps), "half" (half of the contender's own
    median rps) or, for direct only, "half:OTHER" (OTHER's half rate)."""
    latency = {}
    for name, mode, rate, path in lines(latency_path, 4):
        try:
            report = json.load(open(path, encoding="utf-8"))
            percentiles = report.get("latencyPercentiles", {})
            statuses = report.get("statusCodeDistribution", {})
            result = {
                "rate": int(rate),
                "p50_ms": seconds_to_ms(percentiles.get("p50")),
                "p99_ms": seconds_to_ms(percentiles.get("p99")),
                "p99.9_ms": seconds_to_ms(percentiles.get("p99.9")),
                "success_rate": report.get("summary", {}).get("successRate"),
                "achieved_rps": report.get("summary", {}).get("requestsPerSec"),
                "non_2xx": sum(count for status, count in statuses.items() if not status.startswith("2")),
                "errors": sum(report.get("errorDistribution", {}).values()),
            }
        except (OSError, ValueError, TypeError, AttributeError) as error:
            result = {"rate": int(rate), "error": str(error)}
        latency.setdefault(name, {})[mode] = result
    return latency


def summarise(runs, latency):
    """Medians, peaks and totals per contender, in ORDER."""
    contenders = {}
    for name in ORDER:
        if name not in runs:
            continue
        measured = runs[name]
        contenders[name] = {
            "label": LABELS[name],
            "rps_median": median(run["rps"] for run in measured),
            "p99_ms_median": median(run["p99_ms"] for run in measured),
            "p50_ms_median": median(run["p50_ms"] for run in measured),
            "peak_rss_kib_max": max(run["peak_rss_kib"] for run in measured),
            "cpu_pct_median": median(run["cpu_pct"] for run in measured),
            "upstream_cpu_pct_median": median(run["upstream_cpu_pct"] for run in measured),
            "machine_cpu_pct_median": median(run["machine_cpu_pct"] for run in measured),
            "wrk_cpu_pct_median": median(run["wrk_cpu_pct"] for run in measured),
            "other_cpu_pct_median": median(run["other_cpu_pct"] for run in measured),
            "errors": sum(run["non_2xx"] + run["socket_errors"] for run in measured),
            "requests": sum(run["requests"] or 0 for run in measured),
            "runs": sorted(measured, key=lambda run: run["rep"]),
        }
        if name in latency:
            contenders[name]["open_loop_latency"] = latency[name]
    return contenders


def ratio(measured, reference):
    """measured / reference in median rps and p99, or None when either has no rps."""
    if not (measured and reference and measured["rps_median"] and reference["rps_median"]):
        return None
    return {
        "rps": round(measured["rps_median"] / reference["rps_median"], 3),
        "p99": (round(measured["p99_ms_median"] / reference["p99_ms_median"], 3)
                if measured["p99_ms_median"] and reference["p99_ms_median"] else None),
    }


def compute_ratios(contenders):
    ratios = {}
    gatehouse = contenders.get("gatehouse")
    for other in ("nginx", "haproxy", "envoy", "bare"):
        key = f"gatehouse/{'bare-pingora' if other == 'bare' else other}"
        if gatehouse and other in contenders and contenders[other]["rps_median"]:
            ratios[key] = {
                "rps": round(gatehouse["rps_median"] / contenders[other]["rps_median"], 3),
                "p99": (round(gatehouse["p99_ms_median"] / contenders[other]["p99_ms_median"], 3)
                        if gatehouse["p99_ms_median"] and contenders[other]["p99_ms_median"] else None),
            }
        else:
            ratios[key] = None
    # The plain route writing only X-Forwarded-For, against bare Pingora.
    if "gatehouse-xff" in contenders and "bare" in contenders:
        ratios["gatehouse-xff/bare-pingora"] = ratio(contenders["gatehouse-xff"], contenders["bare"])
    # The price of the filters: the same route with and without them, in the same run.
    for variant in VARIANTS:
        if variant in contenders:
            ratios[f"{variant}/gatehouse"] = ratio(contenders[variant], gatehouse)
    for name, baseline in BASELINES.items():
        if baseline in contenders:
            ratios[f"{name}/{baseline}"] = ratio(contenders.get(name), contenders[baseline])
    for name, other in PAIRS.items():
        if name in contenders and other in contenders:
            ratios[f"{name}/{other}"] = ratio(contenders[name], contenders[other])
    return ratios


def read_instructions(path):
    """Instructions per request by contender, and the notes of the contenders without a count."""
    counts, notes = {}, []
    for fields in lines(path, columns=4):
        if fields[0] == "note":
            notes.append(fields[1])
            continue
        name, warmup, requests, instructions = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
        counts[name] = {"warmup_requests": warmup, "requests": requests, "instructions": instructions,
                        "per_request": round(instructions / requests)}
    return counts, notes


def instruction_ratios(counts):
    """The same pairs as the rps ratios, in instructions per request (lower is cheaper)."""
    pairs = []
    if "gatehouse" in counts and "bare" in counts:
        pairs.append(("gatehouse/bare-pingora", "gatehouse", "bare"))
    if "gatehouse-xff" in counts and "bare" in counts:
        pairs.append(("gatehouse-xff/bare-pingora", "gatehouse-xff", "bare"))
    pairs += [(f"{variant}/gatehouse", variant, "gatehouse") for variant in VARIANTS]
    pairs += [(f"{name}/{baseline}", name, baseline) for name, baseline in BASELINES.items()]
    pairs += [(f"{name}/{other}", name, other) for name, other in PAIRS.items()]
    return {key: round(counts[name]["per_request"] / counts[other]["per_request"], 3)
            for key, name, other in pairs if name in counts and other in counts}


def added_p99_vs_direct(latency):
    """The p99 a contender adds to the upstream alone, at the same open-loop rate."""
    added_p99 = {}
    direct_latency = latency.get("direct", {})
    for name in ORDER:
        if name == "direct" or name not in latency:
            continue
        for mode, reference_mode in (("fixed", "fixed"), ("half", f"half:{name}")):
            measured = latency[name].get(mode, {})
            reference = direct_latency.get(reference_mode, {})
            if measured.get("p99_ms") is not None and reference.get("p99_ms") is not None:
                added_p99.setdefault(name, {})[mode] = {
                    "rate": measured["rate"],
                    "added_p99_ms": round(measured["p99_ms"] - reference["p99_ms"], 3),
                }
    return added_p99


def markdown(document, latency, settings):
    """The lines of the RESULTS.md section of this run."""
    stamp, seconds, reps, connections, warmup, proxy_cpu, load_cpu, latency_rps, latency_seconds = settings
    environment = document["environment"]
    contenders = document["contenders"]
    ratios = document["ratios"]
    added_p99 = document["added_p99_vs_direct"]
    skipped = document["skipped"]
    gatehouse = contenders.get("gatehouse")
    baseline = environment.get("gatehouse_baseline")

    out = [f"### {stamp}", ""]
    out.append(f"wrk -t{environment.get('wrk_threads', '1')} -c{connections} -d{seconds}s --latency, {warmup}s warm-up discarded, "
               f"median of {reps} run{'s' if int(reps) != 1 else ''}; {environment.get('threads', '1')} worker thread(s) per proxy, "
               f"proxy on core(s) {proxy_cpu}, wrk and upstream on core(s) {load_cpu}; "
               f"upstream: {environment.get('upstream', 'echo-upstream (hyper, --small)')}. "
               f"{environment.get('cpu', '')}, {environment.get('cores', '?')} cores, "
               f"kernel {environment.get('kernel', '?')}, gatehouse {environment.get('gatehouse_commit', '?')}, "
               f"{f'baseline gatehouse {baseline}, ' if baseline else ''}"
               f"load average {environment.get('load_average_at_start', '?')} at start.")
    out.append("")
    out.append("| contender | rps (median) | p99 ms | p50 ms | peak RSS MiB | proxy CPU % | upstream CPU % | other CPU % | errors | rps per run |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, row in contenders.items():
        per_run = ", ".join(cell(run["rps"]) for run in row["runs"])
        out.append(
            f"| {row['label']} | {cell(row['rps_median'])} | {cell(row['p99_ms_median'], 2)} | "
            f"{cell(row['p50_ms_median'], 2)} | {cell(row['peak_rss_kib_max'] / 1024, 1)} | "
            f"{cell(row['cpu_pct_median'])} | {cell(row['upstream_cpu_pct_median'])} | "
            f"{cell(row['other_cpu_pct_median'])} | "
            f"{row['errors']} | {per_run} |")
    out.append("")
    if any(ratios.values()):
        out.append("| ratio | rps | p99 |")
        out.append("|---|---:|---:|")
        for key, value in ratios.items():
            if value:
                out.append(f"| {key} | {value['rps']:.2f} | {cell(value['p99'], 2)} |")
            else:
                out.append(f"| {key} | n/a | n/a |")
    elif gatehouse:
        out.append("Ratios: n/a (no nginx, HAProxy, Envoy or bare Pingora in this run).")
    else:
        out.append("Ratios: n/a (Gatehouse was not measured in this run).")
    if latency:
        out.append("")
        out.append(f"Open-loop latency (oha -c{connections} -z{latency_seconds}s --latency-correction, after a "
                   f"{warmup}s warm-up at the same rate), at {latency_rps} rps and at half of each "
                   f"contender's own median rps:")
        out.append("")
        out.append("| contender | rate rps | p50 ms | p99 ms | p99.9 ms | success | non-2xx + errors | added p99 vs direct ms |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in ORDER:
            for mode in ("fixed", "half"):
                row = latency.get(name, {}).get(mode)
                if not row:
                    continue
                if "error" in row:
                    out.append(f"| {LABELS[name]} | {row['rate']:,} | unreadable oha output: {row['error']} |||||")
                    continue
                added = added_p99.get(name, {}).get(mode, {}).get("added_p99_ms")
                success = row["success_rate"]
                out.append(
                    f"| {LABELS[name]} | {row['rate']:,} | {cell(row['p50_ms'], 2)} | {cell(row['p99_ms'], 2)} | "
                    f"{cell(row['p99.9_ms'], 2)} | {cell(success * 100 if success is not None else None, 2)} % | "
                    f"{row['non_2xx'] + row['errors']} | {'n/a' if added is None else f'{added:+.2f}'} |")
    # A contender that answered errors fast (a 503 from fail_closed, a 401) served less than its rps
    # suggests; say so under the table rather than let the figure pass as comparable.
    for name, row in contenders.items():
        if row["requests"] and row["errors"] / row["requests"] > 0.01:
            out.append("")
            out.append(f"Warning: {row['label']} answered {row['errors']:,} of {row['requests']:,} requests "
                       f"({row['errors'] / row['requests']:.1%}) with a non-2xx status or a socket error: its rps "
                       "is not comparable with the others.")
    instructions = document.get("instructions")
    if instructions:
        counts = instructions["per_contender"]
        out.append("")
        if counts:
            first = next(iter(counts.values()))
            out.append(f"User-space instructions per request (callgrind, {first['requests']:,} requests on one "
                       f"keep-alive connection after {first['warmup_requests']:,} warm-up requests):")
            out.append("")
            out.append("| contender | instructions per request |")
            out.append("|---|---:|")
            for name, row in counts.items():
                out.append(f"| {LABELS.get(name, name)} | {row['per_request']:,} |")
            if instructions["ratios"]:
                out.append("")
                out.append("| ratio | instructions |")
                out.append("|---|---:|")
                for key, value in instructions["ratios"].items():
                    out.append(f"| {key} | {value:.3f} |")
        for note in instructions["notes"]:
            out.append("")
            out.append(f"Instructions: {note}.")
    for name, reason in skipped.items():
        out.append("")
        out.append(f"Skipped {LABELS.get(name, name)}: {reason}.")
    return out


def main(argv):
    if len(argv) != 17:
        print(f"usage: report.py {ARGUMENTS}", file=sys.stderr)
        return 2
    (runs_path, latency_path, instructions_path, skipped_path, versions_path, json_path, markdown_path, stamp,
     seconds, reps, connections, warmup, proxy_cpu, load_cpu, latency_rps, latency_seconds) = argv[1:]

    runs = read_runs(runs_path)
    latency = read_latency(latency_path)
    contenders = summarise(runs, latency)
    environment = dict(lines(versions_path))
    document = {
        "date": stamp,
        "method": {
            "tool": "wrk", "threads": int(environment.get("wrk_threads", "1")),
            "connections": int(connections),
            "seconds": int(seconds), "warmup_seconds": int(warmup), "reps": int(reps),
            "proxy_cpu": int(proxy_cpu) if proxy_cpu.isdigit() else proxy_cpu,
            "load_cpu": int(load_cpu) if load_cpu.isdigit() else load_cpu,
            "proxy_threads": int(environment.get("threads", "1")),
            "upstream": environment.get("upstream", "echo-upstream (hyper, --small)"),
            "order": "contenders alternate order between reps; each run starts the proxy afresh",
        },
        "environment": environment,
        "contenders": contenders,
        "ratios": compute_ratios(contenders),
        "added_p99_vs_direct": added_p99_vs_direct(latency),
        "skipped": dict(lines(skipped_path)),
    }
    counts, notes = read_instructions(instructions_path)
    if counts or notes:
        ordered = {name: counts[name] for name in ORDER if name in counts}
        document["instructions"] = {"per_contender": ordered, "ratios": instruction_ratios(ordered),
                                    "notes": notes}
        document["method"]["instructions"] = {
            "tool": "valgrind --tool=callgrind", "client": "curl, one keep-alive connection",
            "counted": "user-space instructions of the proxy process between zeroing and dumping",
        }
    if latency:
        document["method"]["latency"] = {
            "tool": "oha", "latency_correction": True, "connections": int(connections),
            "seconds": int(latency_seconds), "fixed_rps": int(latency_rps),
            "half": "half of the contender's own median wrk rps; direct also at each contender's half rate",
        }
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")

    out = markdown(document, latency, (stamp, seconds, reps, connections, warmup, proxy_cpu, load_cpu,
                                       latency_rps, latency_seconds))
    with open(markdown_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
