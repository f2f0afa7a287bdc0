-- wrk script: POST the body in the file named by the first script argument, each request
-- with messageIds of its own: every "MESSAGE_ID" in the file becomes a new id (as the
-- Segment libraries send one with every call), so that the relay's dedup sees new ids.
local body_file, auth = ...
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local parts = {}
local counter = 0
local run = tostring(os.time())

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local template = f:read("*a")
  f:close()
  wrk.headers["Authorization"] = args[2]
  local start = 1
  while true do
    local i, j = string.find(template, "MESSAGE_ID", start, true)
    if i == nil then break end
    parts[#parts + 1] = string.sub(template, start, i - 1)
    start = j + 1
  end
  parts[#parts + 1] = string.sub(template, start)
end

function request()
  local out = {}
  for i = 1, #parts - 1 do
    counter = counter + 1
    out[#out + 1] = parts[i]
    out[#out + 1] = run .. "-" .. counter
  end
  out[#out + 1] = parts[#parts]
  return wrk.format(nil, nil, nil, table.concat(out))
end
