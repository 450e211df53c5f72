-- post-json.lua: POST of a JSON document of about 1 KB (BENCH_BODY_BYTES, default 1024) with
-- `content-type: application/json`.
--
--   wrk -t1 -c64 -d30s -s loadtest/scenarios/post-json.lua http://127.0.0.1:8080/
--
-- Gatehouse has no body-transform filter yet, so this scenario runs against a plain route: it
-- measures streaming a request body through the proxy, without buffering or rewriting it. Once
-- a transform exists, point it at a route that has one.
-- BENCH_PATH overrides the URL's path.

local target = tonumber(os.getenv("BENCH_BODY_BYTES") or "") or 1024

-- A realistic order document, padded to the target size with line items.
local items = {}
local prefix = '{"order_id":"ord_7f3a9c21","customer":{"id":"cus_41d8","email":"buyer@example.com",'
  .. '"tier":"gold"},"currency":"EUR","items":['
local suffix = '],"notes":"leave at the door"}'
local size = #prefix + #suffix
local index = 0
while true do
  index = index + 1
  local item = string.format('{"sku":"SKU-%05d","quantity":%d,"unit_price_cents":%d}',
    index, index % 7 + 1, 1999 + index * 13)
  local separator = (#items > 0) and 1 or 0
  if size + separator + #item > target and #items > 0 then
    break
  end
  items[#items + 1] = item
  size = size + separator + #item
end
local body = prefix .. table.concat(items, ",") .. suffix
-- Pad the notes so the body has exactly the target size when the items fall short of it.
if #body < target then
  body = body:gsub('"leave at the door"', '"leave at the door' .. string.rep(" ", target - #body) .. '"')
end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local path = os.getenv("BENCH_PATH")
if path and path ~= "" then
  wrk.path = path
end
