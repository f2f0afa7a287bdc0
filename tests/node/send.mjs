// Sends the calls in argv[3] (a JSON list of [method, params]) with @segment/analytics-node
// to the relay at argv[2], then flushes; exits 1 if any call reports an error.
// A value {"$rawJSON": "digits"} is sent as those digits, as JSON.rawJSON writes them (an
// integer no JavaScript number holds; Node 20 needs --harmony-json-parse-with-source).
import { Analytics } from '@segment/analytics-node'

const raw = (value) => {
  if (Array.isArray(value)) return value.map(raw)
  if (value && typeof value === 'object') {
    if (typeof value.$rawJSON === 'string') return JSON.rawJSON(value.$rawJSON)
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, raw(v)]))
  }
  return value
}

const [host, callsJson, writeKey] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, flushAt: 20, flushInterval: 50, maxRetries: 0 })
const errors = []
analytics.on('error', (err) => errors.push(String(err && err.reason ? err.reason : err)))
for (const [method, params] of JSON.parse(callsJson)) {
  analytics[method](raw(params), (err) => { if (err) errors.push(String(err)) })
}
await analytics.closeAndFlush({ timeout: 20000 })
if (errors.length) {
  console.error(errors.join('\n'))
  process.exit(1)
}
