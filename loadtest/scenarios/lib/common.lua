-- Shared by the wrk scenarios: environment variables, files, and reading a bearer token.
-- A scenario loads it from its own folder:
--
--   local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
--   local common = dofile(here .. "lib/common.lua")

local common = {}

function common.read_file(path)
  local file, problem = io.open(path, "r")
  if not file then
    error("cannot read the token file: " .. tostring(problem))
  end
  local text = file:read("*a")
  file:close()
  return text
end

function common.env(name)
  local value = os.getenv(name)
  if value and value ~= "" then
    return value
  end
  return nil
end

-- base64url without padding, enough to read a JWT header.
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
function common.base64url_decode(text)
  local bits, count, out = 0, 0, {}
  for index = 1, #text do
    local position = alphabet:find(text:sub(index, index), 1, true)
    if not position then
      return nil
    end
    bits = bits * 64 + (position - 1)
    count = count + 6
    if count >= 8 then
      count = count - 8
      local byte = math.floor(bits / 2 ^ count)
      out[#out + 1] = string.char(byte)
      bits = bits - byte * 2 ^ count
    end
  end
  return table.concat(out)
end

function common.bearer_token(expected_alg)
  local token = common.env("BENCH_JWT_" .. expected_alg) or common.env("BENCH_JWT")
  if not token then
    local path = common.env("BENCH_JWT_" .. expected_alg .. "_FILE") or common.env("BENCH_JWT_FILE")
    if not path then
      error("set BENCH_JWT_" .. expected_alg .. " (or BENCH_JWT) to a token, or BENCH_JWT_"
        .. expected_alg .. "_FILE (or BENCH_JWT_FILE) to a file holding one")
    end
    token = common.read_file(path)
  end
  token = token:gsub("^%s+", ""):gsub("%s+$", "")

  local header = token:match("^([%w_-]+)%.[%w_-]+%.[%w_-]+$")
  local decoded = header and common.base64url_decode(header)
  if not decoded then
    error("the token is not a compact JWT (header.payload.signature)")
  end
  local alg = decoded:match('"alg"%s*:%s*"([^"]+)"')
  if alg ~= expected_alg then
    error("the token's alg is " .. tostring(alg) .. ", this scenario sends " .. expected_alg)
  end
  return token
end

return common
