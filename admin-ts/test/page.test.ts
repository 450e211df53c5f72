// The status page in headless Chromium, while load runs through a real gateway.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, it } from 'node:test';
import { chromium, type Browser } from 'playwright-core';
import { packageDir } from '../src/settings.ts';
import { bootstrapToken, call, createDatabase, eventually, startAdmin, startGateway, upstream, type Admin, type Gateway, type TestDatabase } from './support.ts';

let db: TestDatabase;
let admin: Admin;
let gateway: Gateway;
let browser: Browser | undefined;
let target: Awaited<ReturnType<typeof upstream>>;
let token: string;

before(async () => {
  db = await createDatabase();
  target = await upstream('page');
  token = bootstrapToken(db.url);
  admin = await startAdmin(db.url);
  gateway = await startGateway(db.url);
  const current = await call(admin.url, 'GET', '/api/v1/config', { token });
  const stored = await call(admin.url, 'PUT', '/api/v1/config', {
    token,
    headers: { 'if-match': current.headers.get('etag') as string },
    body: {
      version: 1,
      upstreams: [{ name: 'pages', targets: [{ address: target.address }] }],
      routes: [
        { name: 'catalog', match: { paths: [{ prefix: '/catalog' }] }, upstream: 'pages' },
        { name: 'checkout', match: { paths: [{ prefix: '/checkout' }] }, upstream: 'pages' },
      ],
    },
  });
  assert.equal(stored.status, 200, stored.text);
  assert.ok(await eventually(async () => (await fetch(`${gateway.url}/catalog`)).status === 200, 5000), gateway.logs());
});

after(async () => {
  await browser?.close();
  await gateway?.stop();
  await admin?.stop();
  target?.server.close();
  await db?.drop();
});

it('shows the routes, the targets and a live chart while load runs', async () => {
  // Bounded load: four clients for at most 30 seconds, stopped as soon as the test is done.
  let running = true;
  const deadline = Date.now() + 30_000;
  const load = Promise.all([0, 1, 2, 3].map(async (client) => {
    while (running && Date.now() < deadline) {
      await fetch(`${gateway.url}/${client % 2 ? 'checkout' : 'catalog'}/item`).then((response) => response.arrayBuffer()).catch(() => undefined);
    }
  }));
  try {
    const read = await call(admin.url, 'POST', '/api/v1/tokens', { token, body: { name: 'page', role: 'read', expires_in: '1h' } });
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    const page = await browser.newPage({ viewport: { width: 1100, height: 1400 } });
    const problems: string[] = [];
    page.on('pageerror', (error) => problems.push(error.message));
    page.on('console', (message) => {
      if (message.type() === 'error') problems.push(message.text());
    });
    await page.goto(`${admin.url}/#token=${read.body.token as string}`);
    assert.equal(new URL(page.url()).hash, '', 'the token stays in the address bar');
    await page.waitForFunction(() => {
      const chart = document.getElementById('chart');
      const traffic = document.getElementById('traffic');
      return Number(chart?.dataset.points ?? 0) >= 3 && Number(traffic?.dataset.totalRps ?? 0) > 0;
    }, undefined, { timeout: 25_000 });

    const routes = await page.$$eval('#route-rows tr', (rows) => rows.map((row) => (row as HTMLElement).dataset.route));
    assert.deepEqual(routes, ['catalog', 'checkout']);
    const targets = await page.$$eval('#target-rows tr', (rows) => rows.map((row) => `${(row as HTMLElement).dataset.target} ${(row as HTMLElement).dataset.health}`));
    assert.deepEqual(targets, [`${target.address} healthy`]);
    const traffic = await page.$$eval('#traffic-rows tr', (rows) => rows.map((row) => ({ route: (row as HTMLElement).dataset.route, rps: Number((row as HTMLElement).dataset.rps) })));
    assert.ok(traffic.some((row) => row.route === 'catalog' && row.rps > 0), JSON.stringify(traffic));
    const series = await page.getAttribute('#chart', 'data-series');
    assert.match(series ?? '', /catalog/);
    const nodes = await page.$$eval('#node-rows tr', (rows) => rows.map((row) => (row as HTMLElement).dataset.node));
    assert.deepEqual(nodes, [gateway.node]);
    assert.equal(await page.getAttribute('#versions', 'data-count'), '1');
    // The chart is drawn: its canvas has coloured pixels.
    const painted = await page.$eval('#chart canvas', (canvas) => {
      const context = (canvas as HTMLCanvasElement).getContext('2d');
      if (!context) return 0;
      const { data } = context.getImageData(0, 0, (canvas as HTMLCanvasElement).width, (canvas as HTMLCanvasElement).height);
      let count = 0;
      for (let index = 3; index < data.length; index += 4) if ((data[index] as number) > 0) count += 1;
      return count;
    });
    assert.ok(painted > 100, `the chart canvas is blank (${painted} painted pixels)`);
    const out = process.env.GATEHOUSE_TEST_ARTIFACTS ?? join(packageDir, 'test-results');
    mkdirSync(out, { recursive: true });
    await page.screenshot({ path: join(out, 'status-page.png'), fullPage: true });
    assert.deepEqual(problems, []);
  } finally {
    running = false;
    await load;
  }
});

it('asks for a token, and says why a bad one is refused', async () => {
  browser ??= await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu'] });
  const page = await browser.newPage();
  await page.goto(`${admin.url}/`);
  assert.equal(await page.isVisible('#login'), true);
  await page.fill('#token', 'ghadm_wrong');
  await page.click('button[type=submit]');
  await page.waitForFunction(() => (document.getElementById('login-error')?.textContent ?? '') !== '');
  assert.match((await page.textContent('#login-error')) ?? '', /not known/);
});

