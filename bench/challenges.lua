-- wrk script: POST a different body per request, each at most once, from a file of one JSON
-- body per line (pre-signed wallet challenges: each verify consumes its own).
--
--   wrk -t N ... -s bench/challenges.lua URL -- BODIES_FILE N
--
-- Thread i of N takes lines i, i+N, i+2N, ... (0-based), so no two threads share a body. Once a
-- thread has used its share it asks for /bench/exhausted instead: a 404 that the benchmark
-- counts as an error, never a repeated (and refused) challenge. wrk calls request() once on
-- thread 0 before the run to check the request it makes; that body is taken but never sent.

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local path, count = args[1], tonumber(args[2])
  bodies, taken, exhausted = {}, 0, 0
  local line_number = 0
  for line in io.lines(path) do
    if line_number % count == id and line ~= "" then
      bodies[#bodies + 1] = line
    end
    line_number = line_number + 1
  end
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  if taken < #bodies then
    taken = taken + 1
    return wrk.format("POST", nil, wrk.headers, bodies[taken])
  end
  exhausted = exhausted + 1
  return wrk.format("GET", "/bench/exhausted", wrk.headers, "")
end

function done(summary, latency, requests)
  local total_taken, total_exhausted = 0, 0
  for _, thread in ipairs(threads) do
    total_taken = total_taken + thread:get("taken")
    total_exhausted = total_exhausted + thread:get("exhausted")
  end
  io.write(string.format("bench-bodies: taken %d exhausted %d\n", total_taken, total_exhausted))
end
