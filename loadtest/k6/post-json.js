// post-json: POST of a JSON document of about 1 KB (BENCH_BODY_BYTES, default 1024) with
// `content-type: application/json`.
//
//   k6 run -e BENCH_TARGET=http://127.0.0.1:8080/ loadtest/k6/post-json.js
//
// Gatehouse has no body-transform filter yet, so this scenario runs against a plain route: it
// measures streaming a request body through the proxy, without buffering or rewriting it. Once
// a transform exists, point it at a route that has one. Load shape and target: see
// lib/common.js.

import http from 'k6/http';
import { check } from 'k6';
import { loadOptions, targetUrl } from './lib/common.js';

export const options = loadOptions();

// A realistic order document, padded to the target size with line items, then with spaces in
// the notes; the same document the wrk scenario sends.
function orderDocument(target) {
  const prefix =
    '{"order_id":"ord_7f3a9c21","customer":{"id":"cus_41d8","email":"buyer@example.com",' +
    '"tier":"gold"},"currency":"EUR","items":[';
  const suffix = '],"notes":"leave at the door"}';
  const items = [];
  let size = prefix.length + suffix.length;
  for (let index = 1; ; index += 1) {
    const sku = `SKU-${String(index).padStart(5, '0')}`;
    const item = `{"sku":"${sku}","quantity":${(index % 7) + 1},"unit_price_cents":${1999 + index * 13}}`;
    const separator = items.length > 0 ? 1 : 0;
    if (size + separator + item.length > target && items.length > 0) {
      break;
    }
    items.push(item);
    size += separator + item.length;
  }
  let body = prefix + items.join(',') + suffix;
  if (body.length < target) {
    body = body.replace('"leave at the door"', `"leave at the door${' '.repeat(target - body.length)}"`);
  }
  return body;
}

const body = orderDocument(Number(__ENV.BENCH_BODY_BYTES) || 1024);
const url = targetUrl();
const params = { headers: { 'content-type': 'application/json' } };

export default function () {
  const response = http.post(url, body, params);
  check(response, { 'status is 2xx': (r) => r.status >= 200 && r.status < 300 });
}
