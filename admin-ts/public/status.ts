// The status page: polls /api/v1/status every two seconds and draws what it says. The token
// comes from `#token=...` (kept in this tab's sessionStorage, never sent anywhere but the API)
// or from the form. Chart values are also written to data- attributes, for tests and scripts.

declare const uPlot: {
  new (options: unknown, data: unknown, target: HTMLElement): { setData(data: unknown): void; destroy(): void };
};

interface RouteTraffic { route: string; rps: number; error_rate: number; p99_ms: number | null }
interface Status {
  version: number | null;
  routes: { name: string; upstream: string; match: Record<string, unknown> }[];
  upstreams: { name: string; targets: { address: string; healthy: boolean | null; healthy_on: number; reported_by: number }[] }[];
  versions: { id: number; status: string; author: string; created_at: string; comment: string | null }[];
  nodes: { node: string; applied_version: number | null; behind: number; rejected_version: number | null; rejected_error: string | null; seen_at: string }[];
  traffic: RouteTraffic[];
  sources: { url: string; ok: boolean; error?: string }[];
  at: string;
}

const HISTORY = 90;
const byId = (id: string) => document.getElementById(id) as HTMLElement;
let token = '';
let chart: { setData(data: unknown): void; destroy(): void } | undefined;
let chartRoutes: string[] = [];
const times: number[] = [];
const series = new Map<string, (number | null)[]>();

function cell(text: string, className?: string): HTMLTableCellElement {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function row(cells: HTMLTableCellElement[], data: Record<string, string> = {}): HTMLTableRowElement {
  const tr = document.createElement('tr');
  for (const [key, value] of Object.entries(data)) tr.dataset[key] = value;
  tr.append(...cells);
  return tr;
}

function fill(id: string, rows: HTMLTableRowElement[]) {
  byId(id).replaceChildren(...rows);
}

function describeMatch(match: Record<string, unknown>): string {
  const parts: string[] = [];
  const hosts = match.hosts as string[] | undefined;
  const paths = match.paths as Record<string, string>[] | undefined;
  const methods = match.methods as string[] | undefined;
  if (hosts?.length) parts.push(hosts.join(' '));
  if (paths?.length) parts.push(paths.map((path) => Object.entries(path).map(([kind, value]) => `${kind} ${value}`).join('')).join(', '));
  if (methods?.length) parts.push(methods.join(' '));
  return parts.join(' · ') || 'everything';
}

function ago(iso: string): string {
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 90) return `${seconds}s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)}m ago`;
  return new Date(iso).toLocaleString();
}

function draw(status: Status) {
  byId('version').textContent = `config version ${status.version ?? '–'}`;
  byId('version').dataset.version = String(status.version ?? '');
  byId('updated').textContent = `updated ${new Date(status.at).toLocaleTimeString()}`;

  fill('route-rows', status.routes.map((route) =>
    row([cell(route.name), cell(describeMatch(route.match)), cell(route.upstream)], { route: route.name })));
  byId('routes').dataset.count = String(status.routes.length);

  const targets = status.upstreams.flatMap((upstream) => upstream.targets.map((target) => {
    const state = target.healthy === null ? 'unknown' : target.healthy ? 'healthy' : 'unhealthy';
    const label = target.healthy === null ? 'no data' : `${state} (${target.healthy_on}/${target.reported_by} nodes)`;
    return row([cell(upstream.name), cell(target.address), cell(label, target.healthy === null ? 'unknown' : target.healthy ? 'ok' : 'bad')],
      { upstream: upstream.name, target: target.address, health: state });
  }));
  fill('target-rows', targets);
  byId('upstreams').dataset.count = String(targets.length);

  fill('node-rows', status.nodes.map((node) => row([
    cell(node.node),
    cell(`${node.applied_version ?? '–'}${node.behind > 0 ? ` (${node.behind} behind)` : ''}`, node.behind > 0 ? 'bad' : 'ok'),
    cell(node.rejected_version === null ? '' : `version ${node.rejected_version}: ${node.rejected_error ?? ''}`, 'bad'),
    cell(ago(node.seen_at)),
  ], { node: node.node, appliedVersion: String(node.applied_version ?? '') })));
  byId('nodes').dataset.count = String(status.nodes.length);

  fill('version-rows', status.versions.map((version) => row([
    cell(String(version.id)), cell(version.status, version.status === 'rejected' ? 'bad' : undefined),
    cell(version.author), cell(ago(version.created_at)), cell(version.comment ?? ''),
  ], { version: String(version.id), status: version.status })));
  byId('versions').dataset.count = String(status.versions.length);

  fill('traffic-rows', status.traffic.map((traffic) => row([
    cell(traffic.route), cell(traffic.rps.toFixed(1)),
    cell(`${(traffic.error_rate * 100).toFixed(2)}%`, traffic.error_rate > 0.01 ? 'bad' : undefined),
    cell(traffic.p99_ms === null ? '–' : `${traffic.p99_ms} ms`),
  ], { route: traffic.route, rps: String(traffic.rps), errorRate: String(traffic.error_rate), p99Ms: String(traffic.p99_ms ?? '') })));
  const total = status.traffic.reduce((sum, traffic) => sum + traffic.rps, 0);
  byId('traffic').dataset.totalRps = String(Math.round(total * 10) / 10);
  byId('sources').textContent = status.sources.length === 0
    ? 'No node reports an operations address yet, so there is no traffic data.'
    : status.sources.map((source) => `${source.url}: ${source.ok ? 'ok' : source.error ?? 'failed'}`).join(' · ');

  plot(status);
}

function plot(status: Status) {
  if (status.traffic.length === 0) return;
  times.push(Date.parse(status.at) / 1000);
  for (const traffic of status.traffic) {
    if (!series.has(traffic.route)) series.set(traffic.route, times.slice(0, -1).map(() => null));
  }
  for (const [route, values] of series) {
    values.push(status.traffic.find((traffic) => traffic.route === route)?.rps ?? 0);
  }
  if (times.length > HISTORY) {
    times.shift();
    for (const values of series.values()) values.shift();
  }
  const routes = [...series.keys()];
  const data = [times, ...routes.map((route) => series.get(route) as (number | null)[])];
  const target = byId('chart');
  if (!chart || routes.join('\n') !== chartRoutes.join('\n')) {
    chart?.destroy();
    chartRoutes = routes;
    const colors = ['#2a6fdb', '#d9480f', '#2b8a3e', '#862e9c', '#e67700', '#0b7285'];
    chart = new uPlot({
      width: Math.min(900, Math.max(480, target.clientWidth || 900)),
      height: 240,
      title: 'requests per second, by route',
      series: [{}, ...routes.map((route, index) => ({ label: route, stroke: colors[index % colors.length], width: 2 }))],
      axes: [{}, { label: 'req/s' }],
    }, data, target);
  } else {
    chart.setData(data);
  }
  target.dataset.series = routes.join(',');
  target.dataset.points = String(times.length);
  target.dataset.latestRps = String(status.traffic.reduce((sum, traffic) => sum + traffic.rps, 0));
  byId('traffic').dataset.points = String(times.length);
}

async function poll() {
  try {
    const response = await fetch('/api/v1/status', { headers: { authorization: `Bearer ${token}` } });
    if (response.status === 401 || response.status === 403) {
      const problem = (await response.json()) as { detail?: string };
      sessionStorage.removeItem('gatehouse-admin-token');
      showLogin(problem.detail ?? 'the token was refused');
      return;
    }
    if (response.ok) draw((await response.json()) as Status);
  } catch {
    // The next poll tries again.
  }
  setTimeout(() => void poll(), 2000);
}

function showLogin(error = '') {
  byId('status').hidden = true;
  byId('login').hidden = false;
  byId('login-error').textContent = error;
}

function start(value: string) {
  token = value;
  sessionStorage.setItem('gatehouse-admin-token', value);
  byId('login').hidden = true;
  byId('status').hidden = false;
  void poll();
}

const fromHash = /(?:^#|&)token=([^&]+)/.exec(location.hash)?.[1];
if (fromHash) history.replaceState(null, '', location.pathname);
const saved = fromHash ? decodeURIComponent(fromHash) : sessionStorage.getItem('gatehouse-admin-token');
byId('login').addEventListener('submit', (event) => {
  event.preventDefault();
  const value = (byId('token') as HTMLInputElement).value.trim();
  if (value) start(value);
});
if (saved) start(saved);
else showLogin();
