-- jwt-hs256.lua: GET with `authorization: Bearer <token>`, for a route whose `jwt` filter
-- verifies HS256 signatures with a shared secret. Every request sends the same token, as a
-- client holding one long-lived token does, so Gatehouse verifies the signature once and then
-- answers from its token cache.
--
--   BENCH_JWT_HS256=$(loadtest/mint-jwt.sh HS256 "$SECRET" k1) \
--     wrk -t1 -c64 -d30s -s loadtest/scenarios/jwt-hs256.lua http://127.0.0.1:8080/
--
-- The token comes from BENCH_JWT_HS256, else BENCH_JWT, else the file named by
-- BENCH_JWT_HS256_FILE or BENCH_JWT_FILE. A token whose header does not say HS256 is refused.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "lib/common.lua")
local token = common.bearer_token("HS256")

wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer " .. token
local path = common.env("BENCH_PATH")
if path then
  wrk.path = path
end
