// jwt-rs256: GET with `authorization: Bearer <token>`, for a route whose `jwt` filter verifies
// RS256 signatures. Every request sends the same token, as a client holding one long-lived
// token does, so Gatehouse verifies the signature once and then answers from its token cache.
//
//   k6 run -e BENCH_JWT_RS256="$(loadtest/mint-jwt.sh RS256 tests/support/keys/rsa1.pk8.pem k1)" \
//     -e BENCH_TARGET=http://127.0.0.1:8080/ loadtest/k6/jwt-rs256.js
//
// Token variables and load shape: see lib/common.js.

import http from 'k6/http';
import { check } from 'k6';
import { bearerToken, loadOptions, targetUrl } from './lib/common.js';

export const options = loadOptions();

const url = targetUrl();
const params = { headers: { authorization: `Bearer ${bearerToken('RS256')}` } };

export default function () {
  const response = http.get(url, params);
  check(response, {
    'status is 2xx': (r) => r.status >= 200 && r.status < 300,
    'token accepted (not 401)': (r) => r.status !== 401,
  });
}
