-- rate-limit-consumers.lua: GETs from a rotating set of consumers, for a route with a
-- `rate_limit` filter keyed per consumer. Each request names the next consumer in turn, so
-- every consumer's bucket sees 1/N of the load; consumers over their limit get 429.
-- When the run ends, the script prints how many answers were admitted (2xx), limited (429) and
-- anything else, per the whole run:
--
--   rate-limit: admitted 81234 limited 40321 other 0 consumers 16
--
--   BENCH_CONSUMERS=16 wrk -t2 -c16 -d30s -s loadtest/scenarios/rate-limit-consumers.lua \
--     http://127.0.0.1:8080/limited/
--
-- Consumers are named by one of:
--   BENCH_API_KEYS     comma list of API keys, sent in BENCH_API_KEY_HEADER (default
--                      x-api-key): for a policy keyed by `consumer` behind the `api_key` filter;
--   BENCH_CONSUMERS    a count N (default 10): consumer-1 .. consumer-N in BENCH_CONSUMER_HEADER
--                      (default x-consumer), for a policy keyed by `{header: x-consumer}`.
-- BENCH_PATH overrides the URL's path.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "lib/common.lua")
local env = common.env

local header, consumers = nil, {}
local keys = env("BENCH_API_KEYS")
if keys then
  header = env("BENCH_API_KEY_HEADER") or "x-api-key"
  for key in keys:gmatch("[^,%s]+") do
    consumers[#consumers + 1] = key
  end
else
  header = env("BENCH_CONSUMER_HEADER") or "x-consumer"
  local count = tonumber(env("BENCH_CONSUMERS") or "10")
  if not count or count < 1 then
    error("BENCH_CONSUMERS must be a positive number")
  end
  for index = 1, math.floor(count) do
    consumers[#consumers + 1] = "consumer-" .. index
  end
end
if #consumers == 0 then
  error("BENCH_API_KEYS names no key")
end

wrk.method = "GET"
local path = env("BENCH_PATH")
if path then
  wrk.path = path
end

-- Main thread: keep every thread so done() can add up their counters.
local threads = {}
function setup(thread)
  thread:set("thread_index", #threads)
  threads[#threads + 1] = thread
end

-- Per thread (each has its own Lua state): prebuilt requests, one per consumer, and counters.
local requests, next_request = {}, 1
admitted, limited, other = 0, 0, 0
function init(args)
  for index, value in ipairs(consumers) do
    -- wrk.headers holds Host and any -H headers given to wrk.
    local headers = {}
    for name, header_value in pairs(wrk.headers) do
      headers[name] = header_value
    end
    headers[header] = value
    requests[index] = wrk.format(nil, nil, headers)
  end
  -- Threads start at different consumers so they do not move in lockstep.
  next_request = ((thread_index or 0) % #requests) + 1
end

function request()
  local prepared = requests[next_request]
  next_request = next_request % #requests + 1
  return prepared
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    admitted = admitted + 1
  elseif status == 429 then
    limited = limited + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests_done)
  local total_admitted, total_limited, total_other = 0, 0, 0
  for _, thread in ipairs(threads) do
    total_admitted = total_admitted + (thread:get("admitted") or 0)
    total_limited = total_limited + (thread:get("limited") or 0)
    total_other = total_other + (thread:get("other") or 0)
  end
  io.write(string.format("rate-limit: admitted %d limited %d other %d consumers %d\n",
    total_admitted, total_limited, total_other, #consumers))
end
