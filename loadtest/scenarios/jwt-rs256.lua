-- jwt-rs256.lua: GET with `authorization: Bearer <token>`, for a route whose `jwt` filter
-- verifies RS256 signatures. Every request sends the same token, as a client holding one
-- long-lived token does, so Gatehouse verifies the signature once and then answers from its
-- token cache.
--
--   BENCH_JWT_RS256=$(loadtest/mint-jwt.sh RS256 tests/support/keys/rsa1.pk8.pem k1) \
--     wrk -t1 -c64 -d30s -s loadtest/scenarios/jwt-rs256.lua http://127.0.0.1:8080/
--
-- The token comes from BENCH_JWT_RS256, else BENCH_JWT, else the file named by
-- BENCH_JWT_RS256_FILE or BENCH_JWT_FILE. A token whose header does not say RS256 is refused.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "lib/common.lua")
local token = common.bearer_token("RS256")

wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer " .. token
local path = common.env("BENCH_PATH")
if path then
  wrk.path = path
end
