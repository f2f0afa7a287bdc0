-- wrk script: POST the body in the file named by the first script argument, with the
-- relay's write key as HTTP Basic auth.
local body_file, auth = ...
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = auth

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Authorization"] = args[2]
end
