// Shared pieces of the k6 scenarios: the target, the load shape and the credentials, all read
// from environment variables (`k6 run -e NAME=value` or the process environment).
//
//   BENCH_TARGET    URL to load (default http://127.0.0.1:8080/)
//   BENCH_PATH      path appended to BENCH_TARGET's origin instead of its own path
//   BENCH_VUS       virtual users, i.e. concurrent connections (default 64)
//   BENCH_DURATION  how long to run (default 30s)
//   BENCH_RATE      requests per second: when set, an open-loop constant-arrival-rate run
//                   (latency measured against the schedule), otherwise a closed loop of
//                   BENCH_VUS users sending back to back as wrk does

import encoding from 'k6/encoding';

export function targetUrl() {
  const target = __ENV.BENCH_TARGET || 'http://127.0.0.1:8080/';
  const path = __ENV.BENCH_PATH;
  if (!path) {
    return target;
  }
  const origin = target.match(/^(https?:\/\/[^/]+)/);
  if (!origin) {
    throw new Error(`BENCH_TARGET is not an http(s) URL: ${target}`);
  }
  return origin[1] + (path.startsWith('/') ? path : `/${path}`);
}

function positiveNumber(name, fallback) {
  const text = __ENV[name];
  if (text === undefined || text === '') {
    return fallback;
  }
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0) {
    throw new Error(`${name} must be a positive number, not "${text}"`);
  }
  return value;
}

// k6 options for the load shape; `thresholds` is merged in.
export function loadOptions(thresholds = {}) {
  const vus = Math.floor(positiveNumber('BENCH_VUS', 64));
  const duration = __ENV.BENCH_DURATION || '30s';
  const rate = positiveNumber('BENCH_RATE', 0);
  const base = {
    thresholds: { http_req_failed: ['rate<0.01'], ...thresholds },
    summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
  };
  if (rate > 0) {
    return {
      ...base,
      scenarios: {
        open_loop: {
          executor: 'constant-arrival-rate',
          rate: Math.floor(rate),
          timeUnit: '1s',
          duration,
          preAllocatedVUs: vus,
          maxVUs: vus * 4,
        },
      },
    };
  }
  return { ...base, vus, duration };
}

function variable(name) {
  const value = __ENV[name];
  return value === undefined || value === '' ? undefined : value;
}

// A compact JWT whose header names `algorithm`, from BENCH_JWT_<ALG>, BENCH_JWT, or the file
// named by BENCH_JWT_<ALG>_FILE or BENCH_JWT_FILE (an absolute path is safest: k6 resolves
// relative ones against the script). Must run in the init context, where open() is allowed.
export function bearerToken(algorithm) {
  let token = variable(`BENCH_JWT_${algorithm}`) || variable('BENCH_JWT');
  if (!token) {
    const path = variable(`BENCH_JWT_${algorithm}_FILE`) || variable('BENCH_JWT_FILE');
    if (!path) {
      throw new Error(
        `set BENCH_JWT_${algorithm} (or BENCH_JWT) to a token, or BENCH_JWT_${algorithm}_FILE ` +
          '(or BENCH_JWT_FILE) to a file holding one; loadtest/mint-jwt.sh makes one',
      );
    }
    token = open(path);
  }
  token = token.trim();
  const parts = token.split('.');
  if (parts.length !== 3) {
    throw new Error('the token is not a compact JWT (header.payload.signature)');
  }
  let header;
  try {
    header = JSON.parse(encoding.b64decode(parts[0], 'rawurl', 's'));
  } catch (error) {
    throw new Error(`the token's header is not base64url JSON: ${error}`);
  }
  if (header.alg !== algorithm) {
    throw new Error(`the token's alg is ${header.alg}, this scenario sends ${algorithm}`);
  }
  return token;
}
