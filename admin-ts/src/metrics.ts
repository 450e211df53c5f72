// Reads the gateway nodes' /metrics (Prometheus text) for the status page: request rate, error
// rate and p99 per route, and the health of each upstream target.

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export function parsePrometheus(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels: Record<string, string> = {};
    const labelText = match[2] ?? '';
    for (const label of labelText.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[label[1] as string] = (label[2] as string).replace(/\\(.)/g, (_all, char: string) => (char === 'n' ? '\n' : char));
    }
    const value = Number(match[3]);
    if (!Number.isNaN(value)) samples.push({ name: match[1] as string, labels, value });
  }
  return samples;
}

interface Scrape {
  at: number;
  /** Per source URL: its samples. */
  samples: Map<string, Sample[]>;
}

export interface SourceState {
  url: string;
  ok: boolean;
  error?: string;
}

export interface RouteTraffic {
  route: string;
  rps: number;
  error_rate: number;
  p99_ms: number | null;
}

export interface TargetHealth {
  upstream: string;
  target: string;
  healthy: boolean;
  /** Nodes reporting it healthy, of the nodes reporting it. */
  healthy_on: number;
  reported_by: number;
}

const KEEP_MS = 60_000;
const MIN_INTERVAL_MS = 900;

export class Scraper {
  private history: Scrape[] = [];
  private sources: SourceState[] = [];
  private inflight: Promise<void> | undefined;

  /** Scrapes `urls` (at most about once a second) and keeps the samples for rates. */
  async refresh(urls: string[]): Promise<void> {
    const last = this.history[this.history.length - 1];
    if (last && Date.now() - last.at < MIN_INTERVAL_MS) return;
    if (this.inflight) return this.inflight;
    this.inflight = (async () => {
      const samples = new Map<string, Sample[]>();
      this.sources = await Promise.all(
        urls.map(async (url): Promise<SourceState> => {
          try {
            const response = await fetch(url, { signal: AbortSignal.timeout(2000) });
            if (!response.ok) return { url, ok: false, error: `HTTP ${response.status}` };
            samples.set(url, parsePrometheus(await response.text()));
            return { url, ok: true };
          } catch (error) {
            return { url, ok: false, error: (error as Error).message };
          }
        }),
      );
      const now = Date.now();
      this.history.push({ at: now, samples });
      this.history = this.history.filter((scrape) => now - scrape.at <= KEEP_MS);
    })().finally(() => {
      this.inflight = undefined;
    });
    return this.inflight;
  }

  sourceStates(): SourceState[] {
    return this.sources;
  }

  /** Rates over the last ~10 seconds of scrapes (empty until there are two). */
  traffic(): RouteTraffic[] {
    const latest = this.history[this.history.length - 1];
    if (!latest) return [];
    const baseline = [...this.history].reverse().find((scrape) => latest.at - scrape.at >= 1500 && latest.at - scrape.at <= 15_000)
      ?? (this.history.length > 1 ? this.history[0] : undefined);
    if (!baseline || baseline === latest) return [];
    const seconds = (latest.at - baseline.at) / 1000;
    const sum = (scrape: Scrape, name: string, match: (labels: Record<string, string>) => boolean) => {
      const out = new Map<string, number>();
      for (const samples of scrape.samples.values()) {
        for (const sample of samples) {
          if (sample.name !== name || !match(sample.labels)) continue;
          const key = JSON.stringify([sample.labels.route ?? '', sample.labels.le ?? '', sample.labels.status_class ?? '']);
          out.set(key, (out.get(key) ?? 0) + sample.value);
        }
      }
      return out;
    };
    const delta = (name: string) => {
      const now = sum(latest, name, () => true);
      const before = sum(baseline, name, () => true);
      const out = new Map<string, number>();
      for (const [key, value] of now) out.set(key, Math.max(0, value - (before.get(key) ?? 0)));
      return out;
    };
    const requests = delta('gatehouse_requests_total');
    const buckets = delta('gatehouse_request_duration_seconds_bucket');
    const routes = new Map<string, { total: number; errors: number; buckets: [number, number][] }>();
    const entry = (route: string) => {
      let found = routes.get(route);
      if (!found) {
        found = { total: 0, errors: 0, buckets: [] };
        routes.set(route, found);
      }
      return found;
    };
    for (const [key, value] of requests) {
      const [route, , statusClass] = JSON.parse(key) as [string, string, string];
      const totals = entry(route);
      totals.total += value;
      if (statusClass === '5xx') totals.errors += value;
    }
    for (const [key, value] of buckets) {
      const [route, le] = JSON.parse(key) as [string, string, string];
      entry(route).buckets.push([le === '+Inf' ? Infinity : Number(le), value]);
    }
    return [...routes.entries()]
      .map(([route, totals]) => {
        const sorted = totals.buckets.sort((a, b) => a[0] - b[0]);
        const count = sorted.length > 0 ? (sorted[sorted.length - 1] as [number, number])[1] : 0;
        let p99: number | null = null;
        if (count > 0) {
          const bound = sorted.find(([, cumulative]) => cumulative >= 0.99 * count);
          if (bound) p99 = Number.isFinite(bound[0]) ? bound[0] * 1000 : (sorted[sorted.length - 2]?.[0] ?? 0) * 1000;
        }
        return {
          route,
          rps: Math.round((totals.total / seconds) * 10) / 10,
          error_rate: totals.total > 0 ? Math.round((totals.errors / totals.total) * 10000) / 10000 : 0,
          p99_ms: p99,
        };
      })
      .sort((a, b) => a.route.localeCompare(b.route));
  }

  targets(): TargetHealth[] {
    const latest = this.history[this.history.length - 1];
    if (!latest) return [];
    const states = new Map<string, TargetHealth>();
    for (const samples of latest.samples.values()) {
      for (const sample of samples) {
        if (sample.name !== 'gatehouse_upstream_target_healthy') continue;
        const upstream = sample.labels.upstream ?? '';
        const target = sample.labels.target ?? '';
        const key = `${upstream}\u0000${target}`;
        const state = states.get(key) ?? { upstream, target, healthy: true, healthy_on: 0, reported_by: 0 };
        state.reported_by += 1;
        if (sample.value >= 1) state.healthy_on += 1;
        state.healthy = state.healthy_on === state.reported_by;
        states.set(key, state);
      }
    }
    return [...states.values()];
  }
}
