-- plain.lua: GET on the path of wrk's URL, no credentials. The baseline every other scenario
-- is compared with.
--
--   wrk -t1 -c64 -d30s -s loadtest/scenarios/plain.lua http://127.0.0.1:8080/
--
-- BENCH_PATH overrides the path (default: the path of the URL given to wrk).

wrk.method = "GET"
local path = os.getenv("BENCH_PATH")
if path and path ~= "" then
  wrk.path = path
end
