// jwt-hs256: GET with `authorization: Bearer <token>`, for a route whose `jwt` filter verifies
// HS256 signatures with a shared secret. Every request sends the same token, as a client holding
// one long-lived token does, so Gatehouse verifies the signature once and then answers from its
// token cache.
//
//   k6 run -e BENCH_JWT_HS256="$(loadtest/mint-jwt.sh HS256 "$SECRET" k1)" \
//     -e BENCH_TARGET=http://127.0.0.1:8080/ loadtest/k6/jwt-hs256.js
//
// Token variables and load shape: see lib/common.js.

import http from 'k6/http';
import { check } from 'k6';
import { bearerToken, loadOptions, targetUrl } from './lib/common.js';

export const options = loadOptions();

const url = targetUrl();
const params = { headers: { authorization: `Bearer ${bearerToken('HS256')}` } };

export default function () {
  const response = http.get(url, params);
  check(response, {
    'status is 2xx': (r) => r.status >= 200 && r.status < 300,
    'token accepted (not 401)': (r) => r.status !== 401,
  });
}
