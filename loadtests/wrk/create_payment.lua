-- wrk script for `make bench`: POST /payments with a fresh idempotency key and trip id per request.
-- Arguments after `--`: <key prefix> <first trip id>. Each wrk thread numbers its own requests, so
-- keys and trips never repeat within a run, and distinct prefixes/trip bases keep runs apart.
-- done() prints one line `WRK_JSON {...}` that loadtests/bench (load.run_wrk) parses.

local counter = 0
local prefix = "bench"
local trip_base = 1000000000
local next_thread = 0

function setup(thread)
   thread:set("thread_index", next_thread)
   next_thread = next_thread + 1
end

function init(args)
   prefix = args[1] or prefix
   trip_base = tonumber(args[2] or trip_base)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   counter = counter + 1
   local index = thread_index or 0
   local body = string.format(
      '{"idempotency_key":"%s-%d-%d","trip_id":%d,"method":"CARD","amount":150.00,'
         .. '"metadata":{"note":"bench"}}',
      prefix, index, counter, trip_base + index * 100000000 + counter)
   return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,'
         .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,'
         .. '"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean))
end
