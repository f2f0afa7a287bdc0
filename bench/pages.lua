-- wrk script: POST page calls, five from each anonymous user in turn (the first opens a
-- session when sessions are on, the next four extend it). Arguments: the Authorization header value.
local counter = 0
local auth = ""
local salt = 0

function init(args)
  auth = args[2]
  salt = math.random(1, 1000000000)
end

request = function()
  counter = counter + 1
  local user = math.floor((counter - 1) / 5)
  local body = '{"anonymousId":"a' .. salt .. '-' .. user .. '","name":"Home",'
    .. '"properties":{"path":"/home","url":"https://shop.example/home","title":"Home"},'
    .. '"context":{"userAgent":"Mozilla/5.0 (X11; Linux x86_64)","ip":"203.0.113.7",'
    .. '"page":{"url":"https://shop.example/home","path":"/home"}},'
    .. '"timestamp":"2024-03-01T12:00:00.000Z"}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = auth}, body)
end
