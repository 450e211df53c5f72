// rate-limit-consumers: GETs from a rotating set of consumers, for a route with a `rate_limit`
// filter keyed per consumer. Each iteration names the next consumer in turn, so every bucket
// sees 1/N of the load; consumers over their limit get 429, which counts as an expected answer
// here, not a failure. The end-of-test summary shows the counters ratelimit_admitted (2xx),
// ratelimit_limited (429) and ratelimit_other (anything else; the threshold wants none).
//
//   k6 run -e BENCH_CONSUMERS=16 -e BENCH_TARGET=http://127.0.0.1:8080/limited/ \
//     loadtest/k6/rate-limit-consumers.js
//
// Consumers are named by one of:
//   BENCH_API_KEYS   comma list of API keys, sent in BENCH_API_KEY_HEADER (default x-api-key):
//                    for a policy keyed by `consumer` behind the `api_key` filter;
//   BENCH_CONSUMERS  a count N (default 10): consumer-1 .. consumer-N in BENCH_CONSUMER_HEADER
//                    (default x-consumer), for a policy keyed by `{header: x-consumer}`.
// Load shape and target: see lib/common.js.

import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import { loadOptions, targetUrl } from './lib/common.js';

export const options = loadOptions({ ratelimit_other: ['count<1'] });

function consumerHeaders() {
  if (__ENV.BENCH_API_KEYS) {
    const header = __ENV.BENCH_API_KEY_HEADER || 'x-api-key';
    const keys = __ENV.BENCH_API_KEYS.split(',').map((key) => key.trim()).filter((key) => key);
    if (keys.length === 0) {
      throw new Error('BENCH_API_KEYS names no key');
    }
    return keys.map((key) => ({ [header]: key }));
  }
  const header = __ENV.BENCH_CONSUMER_HEADER || 'x-consumer';
  const count = Number(__ENV.BENCH_CONSUMERS || 10);
  if (!Number.isInteger(count) || count < 1) {
    throw new Error('BENCH_CONSUMERS must be a positive whole number');
  }
  return Array.from({ length: count }, (_, index) => ({ [header]: `consumer-${index + 1}` }));
}

const consumers = consumerHeaders();
const url = targetUrl();
const admitted = new Counter('ratelimit_admitted');
const limited = new Counter('ratelimit_limited');
const other = new Counter('ratelimit_other');

// 429 is the answer this scenario provokes: keep it out of http_req_failed.
http.setResponseCallback(http.expectedStatuses({ min: 200, max: 299 }, 429));

export default function () {
  const headers = consumers[exec.scenario.iterationInTest % consumers.length];
  const response = http.get(url, { headers });
  if (response.status >= 200 && response.status < 300) {
    admitted.add(1);
  } else if (response.status === 429) {
    limited.add(1);
  } else {
    other.add(1);
  }
  check(response, {
    '2xx or 429': (r) => (r.status >= 200 && r.status < 300) || r.status === 429,
    '429 carries retry-after': (r) => r.status !== 429 || r.headers['Retry-After'] !== undefined,
  });
}
