// apikey: GET with an API key header, for a route with the `api_key` filter. Gatehouse hashes
// the presented key (SHA-256) on every request and looks the hash up among its consumers'
// credentials.
//
//   k6 run -e BENCH_API_KEY=ghk_... -e BENCH_TARGET=http://127.0.0.1:8080/ loadtest/k6/apikey.js
//
// BENCH_API_KEY is the key (required); BENCH_API_KEY_HEADER the header that carries it (default
// x-api-key, the `api_key` filter's default). Load shape and target: see lib/common.js.

import http from 'k6/http';
import { check } from 'k6';
import { loadOptions, targetUrl } from './lib/common.js';

export const options = loadOptions();

const key = __ENV.BENCH_API_KEY;
if (!key) {
  throw new Error("set BENCH_API_KEY to a key one of Gatehouse's consumers holds");
}
const url = targetUrl();
const params = { headers: { [__ENV.BENCH_API_KEY_HEADER || 'x-api-key']: key } };

export default function () {
  const response = http.get(url, params);
  check(response, {
    'status is 2xx': (r) => r.status >= 200 && r.status < 300,
    'key accepted (not 401)': (r) => r.status !== 401,
  });
}
