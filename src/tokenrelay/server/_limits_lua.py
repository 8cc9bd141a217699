"""The shared limiter's server-side scripts (``shared_limits.py``): one round trip each,
atomic, on Redis's clock (``TIME``), so that every process judges by the same instant.

Keys of a gateway key id ``K`` (the ``{lim:K}`` hash tag keeps them in one Redis Cluster
slot, so each script touches one slot):

* ``PREFIX{lim:K}:c`` sorted set, concurrency slots: member = the admission's id, score =
  when its lease lapses (ms). A process renews its slots every second; the slots of one
  that died lapse ``LEASE_MS`` after its last renewal and are dropped by the next
  admission (the key itself expires when nobody renews anything in it).
* ``PREFIX{lim:K}:r`` sorted set, requests of the last 60 s: member = id, score = ms.
* ``PREFIX{lim:K}:t`` sorted set, token amounts of the last 60 s: member ``id:N`` (a
  reservation of N) or ``id:s:D`` (its settlement, D = used - reserved, maybe negative),
  score = ms; ``PREFIX{lim:K}:n`` their running sum (recounted from ``:t`` if it is lost).

The same sliding 60 s windows as the in-memory ``Limiter`` (an entry stops counting 60 s
after it was made), so N processes sharing them admit exactly what one process would.

Every script is safe to run twice (``RedisLink.run`` resends a batch after a connection
error): an admission whose id is already recorded answers "admitted" again without
recording it twice, a settlement already recorded is not added again.
"""

from __future__ import annotations

_COMMON = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function amount(member)
  return tonumber(string.match(member, ':(-?%d+)$')) or 0
end
-- the tokens of the last 60 s (entries older are dropped from the set and the sum)
local function tokens(t, n, window)
  local total = tonumber(redis.call('GET', n) or '')
  if total == nil then
    redis.call('ZREMRANGEBYSCORE', t, '-inf', window)
    total = 0
    for _, member in ipairs(redis.call('ZRANGE', t, 0, -1)) do
      total = total + amount(member)
    end
  else
    local old = redis.call('ZRANGEBYSCORE', t, '-inf', window)
    if #old > 0 then
      for _, member in ipairs(old) do total = total - amount(member) end
      redis.call('ZREMRANGEBYSCORE', t, '-inf', window)
    end
  end
  return total
end
"""

#: KEYS c r t n; ARGV id max_concurrent rpm tpm reserve lease_ms (0: no such limit)
#: → {0, 0} admitted | {1, retry_ms} concurrency | {2, retry_ms} requests/min |
#: {3, retry_ms} tokens/min
ADMIT = _COMMON + """
local c, r, t, n = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id = ARGV[1]
local conc, rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local reserve, lease = tonumber(ARGV[5]), tonumber(ARGV[6])
local window = now - 60000
local reservation = id .. ':' .. ARGV[5]
-- sent again after a lost reply: it was admitted the first time
if (conc > 0 and redis.call('ZSCORE', c, id))
    or (rpm > 0 and redis.call('ZSCORE', r, id))
    or (tpm > 0 and reserve > 0 and redis.call('ZSCORE', t, reservation)) then
  return {0, 0}
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', c, '-inf', now)
  if redis.call('ZCARD', c) >= conc then return {1, 1000} end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', r, '-inf', window)
  if redis.call('ZCARD', r) >= rpm then
    local first = redis.call('ZRANGE', r, 0, 0, 'WITHSCORES')
    return {2, tonumber(first[2]) + 60000 - now}
  end
end
local total = 0
if tpm > 0 then
  total = tokens(t, n, window)
  if total + reserve > tpm then
    local first = redis.call('ZRANGE', t, 0, 0, 'WITHSCORES')
    if #first == 0 then return {3, 60000} end
    return {3, tonumber(first[2]) + 60000 - now}
  end
end
if conc > 0 then
  redis.call('ZADD', c, now + lease, id)
  redis.call('PEXPIRE', c, lease * 2)
end
if rpm > 0 then
  redis.call('ZADD', r, now, id)
  redis.call('PEXPIRE', r, 61000)
end
if tpm > 0 then
  if reserve > 0 then redis.call('ZADD', t, now, reservation) end
  redis.call('SET', n, total + reserve, 'PX', 61000)
  redis.call('PEXPIRE', t, 61000)
end
return {0, 0}
"""

#: KEYS c t n; ARGV id release_slot(0|1) delta → 1
#: The end of an admitted request: its slot freed, its reservation settled with the real
#: usage (``delta`` = used - reserved, recorded now, as the in-memory limiter does).
RELEASE = _COMMON + """
if ARGV[2] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local delta = tonumber(ARGV[3])
if delta ~= 0 then
  local member = ARGV[1] .. ':s:' .. ARGV[3]
  if not redis.call('ZSCORE', KEYS[2], member) then
    redis.call('ZADD', KEYS[2], now, member)
    redis.call('PEXPIRE', KEYS[2], 61000)
    if redis.call('EXISTS', KEYS[3]) == 1 then
      redis.call('INCRBY', KEYS[3], delta)
      redis.call('PEXPIRE', KEYS[3], 61000)
    end
  end
end
return 1
"""

#: KEYS c; ARGV lease_ms id... → renewed count
#: The slots of this process's running streams of one key, renewed for ``lease_ms``; a
#: slot that is gone (Redis restarted empty, or the lease lapsed while Redis was out of
#: reach) is added again: the stream is still running, and it counts.
RENEW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return #ARGV - 1
"""
