// Sends the calls in argv[3] (a JSON list of [method, params]) with @segment/analytics-node
// to the relay at argv[2], then flushes; exits 1 if any call reports an error.
import { Analytics } from '@segment/analytics-node'

const [host, callsJson, writeKey] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, flushAt: 20, flushInterval: 50, maxRetries: 0 })
const errors = []
analytics.on('error', (err) => errors.push(String(err && err.reason ? err.reason : err)))
for (const [method, params] of JSON.parse(callsJson)) {
  analytics[method](params, (err) => { if (err) errors.push(String(err)) })
}
await analytics.closeAndFlush({ timeout: 20000 })
if (errors.length) {
  console.error(errors.join('\n'))
  process.exit(1)
}
