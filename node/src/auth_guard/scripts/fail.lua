-- Counts one failed login against each subject (an address, a user name):
-- the same steps as `Record::fail` in throttle.rs.
--
-- KEYS: for each subject its failure counter and its block key.
-- ARGV: for each subject max_failures (0: never block), window ms, block ms.
-- Returns: for each subject {failures, block ms left, 1 if this failure
--          started the block else 0}, flattened.
-- The counter expires a window after the last failure, the block key when
-- the block ends: nothing is left behind. O(subjects), no scans.
local out = {}
for i = 1, #KEYS / 2 do
  local count, block = KEYS[2 * i - 1], KEYS[2 * i]
  local max = tonumber(ARGV[3 * i - 2])
  local window, block_ms = ARGV[3 * i - 1], ARGV[3 * i]
  local left = redis.call('PTTL', block)
  if left > 0 then
    out[#out + 1] = 0
    out[#out + 1] = left
    out[#out + 1] = 0
  else
    local failures = redis.call('INCR', count)
    redis.call('PEXPIRE', count, window)
    if max > 0 and failures >= max then
      redis.call('DEL', count)
      redis.call('SET', block, '1', 'PX', block_ms)
      out[#out + 1] = 0
      out[#out + 1] = tonumber(block_ms)
      out[#out + 1] = 1
    else
      out[#out + 1] = failures
      out[#out + 1] = 0
      out[#out + 1] = 0
    end
  end
end
return out
