// plain: GET with no credentials, the baseline the other scenarios are compared with.
//
//   k6 run -e BENCH_TARGET=http://127.0.0.1:8080/ loadtest/k6/plain.js
//
// Load shape and target: see lib/common.js.

import http from 'k6/http';
import { check } from 'k6';
import { loadOptions, targetUrl } from './lib/common.js';

export const options = loadOptions();

const url = targetUrl();

export default function () {
  const response = http.get(url);
  check(response, { 'status is 2xx': (r) => r.status >= 200 && r.status < 300 });
}
