-- Completes an attempt in one call, on one server: the record's
-- compare-and-set (write_record.lua) and, unless the record changed
-- meanwhile, the filing of the delivery (file.lua), atomically. Loaded
-- behind write_record.lua and file.lua, each wrapped as a local function
-- of (KEYS, ARGV): write_record and file.
-- KEYS: write_record's keys, then file's five domain keys, then the
--       listings a finished message leaves, then those a message whose
--       record is gone leaves
-- ARGV: how many keys write_record takes, how many arguments, how many
--       listings of each kind; write_record's arguments; file's arguments
-- Returns {1, current} when the record changed meanwhile (nothing filed),
--       else {0 gone / 2 written, filed 1/0, 1 if the domain holds no
--       work at all now}.
-- Complexity: O(log N).
local nkeys, nargs = tonumber(ARGV[1]), tonumber(ARGV[2])
local ndone, ngone = tonumber(ARGV[3]), tonumber(ARGV[4])
local function slice(t, from, to)
  local out = {}
  for i = from, to do out[#out + 1] = t[i] end
  return out
end
local written = write_record(slice(KEYS, 1, nkeys), slice(ARGV, 5, 4 + nargs))
if written[1] == 1 then return written end
local keys = slice(KEYS, nkeys + 1, nkeys + 5)
local from, count = nkeys + 6, ndone
if written[1] == 0 then from, count = nkeys + 6 + ndone, ngone end
for i = from, from + count - 1 do keys[#keys + 1] = KEYS[i] end
local filed = file(keys, slice(ARGV, 5 + nargs, #ARGV))
return {written[1], filed[1], filed[2]}
