-- Where the subjects of a login stand, and whether the address is trusted
-- for the user (it logged in as that user recently).
--
-- KEYS: for each subject its failure counter and its block key, in that
--       order; then, optionally, the trust key.
-- ARGV[1]: the number of subjects.
-- Returns: for each subject {failures, block ms left (0: not blocked)},
--          flattened, then 1 if the trust key exists else 0.
-- O(subjects): at most two subjects and five keys; no scans.
local out = {}
local subjects = tonumber(ARGV[1])
for i = 1, subjects do
  out[#out + 1] = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0') or 0
  local left = redis.call('PTTL', KEYS[2 * i])
  if left < 0 then left = 0 end
  out[#out + 1] = left
end
local trusted = 0
if #KEYS > 2 * subjects then
  trusted = redis.call('EXISTS', KEYS[2 * subjects + 1])
end
out[#out + 1] = trusted
return out
