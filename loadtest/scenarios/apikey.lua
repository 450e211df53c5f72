-- apikey.lua: GET with an API key header, for a route with the `api_key` filter. Gatehouse
-- hashes the presented key (SHA-256) on every request and looks the hash up among its
-- consumers' credentials.
--
--   BENCH_API_KEY=ghk_... wrk -t1 -c64 -d30s -s loadtest/scenarios/apikey.lua http://127.0.0.1:8080/
--
-- BENCH_API_KEY is the key (required); BENCH_API_KEY_HEADER the header that carries it
-- (default x-api-key, the `api_key` filter's default); BENCH_PATH overrides the URL's path.

local key = os.getenv("BENCH_API_KEY")
if not key or key == "" then
  error("set BENCH_API_KEY to a key one of Gatehouse's consumers holds")
end
local header = os.getenv("BENCH_API_KEY_HEADER")
if not header or header == "" then
  header = "x-api-key"
end

wrk.method = "GET"
wrk.headers[header] = key
local path = os.getenv("BENCH_PATH")
if path and path ~= "" then
  wrk.path = path
end
