"""The Redis stream log's server-side scripts (one round trip each, atomic).

Keys of a stream ``ID`` (the ``{ID}`` hash tag keeps them in one Redis Cluster slot):

* ``PREFIX{ID}:m`` hash: ``o`` owner, ``e`` endpoint, ``t`` created, ``s`` status, ``n``
  last seq, ``b`` bytes, ``f`` finished, ``m`` meta (JSON), ``h`` last lease holder;
* ``PREFIX{ID}:x`` Redis Stream: frame ``seq`` is entry ``0-(seq+1)``, field ``d`` the
  frame; the final entry also has ``end`` = the final status;
* ``PREFIX{ID}:l`` the producer lease: the holder token, PX 1.5 s, refreshed every 0.5 s;
* ``PREFIX{ID}:c`` the cancel flag (a cancel also PUBLISHes the id on ``PREFIXcancel``);
* ``PREFIX{ID}:r`` sorted set of the readers attached (any process), scored by when their
  presence lapses unless renewed (every 0.5 s, like leases).

Every key has a TTL (``retention_s``), renewed while the producer is alive.

Appends are a script rather than a MULTI of XADDs: the same single round trip per tick,
and it can check the lease holder and the expected sequence number atomically (a
producer that lost its lease, or a retried call, can never write a frame twice).
"""

from __future__ import annotations

_FINAL = "local FINAL = {completed=true, failed=true, cancelled=true, incomplete=true}\n"

#: KEYS m l; ARGV holder owner endpoint created status meta lease_ms ttl_ms → 1 | 0
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'h') == ARGV[1] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'o', ARGV[2], 'e', ARGV[3], 't', ARGV[4], 's', ARGV[5],
           'n', -1, 'b', 0, 'm', ARGV[6], 'h', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[7])
return 1
"""

#: KEYS m x l; ARGV holder first_seq live_status final_status finished_at ttl_ms lease_ms
#: max_bytes frame... → {code, last_seq}: 1 ok, -1 gone, -2 ended, -3 lease not held,
#: -4 sequence conflict, -5 over max_bytes. An empty holder ends a stream whose producer
#: is lost: only when no lease exists.
APPEND = _FINAL + """
local m, x, l = KEYS[1], KEYS[2], KEYS[3]
local st = redis.call('HMGET', m, 's', 'n', 'b', 'h')
if not st[1] then return {-1, -1} end
local last = tonumber(st[2])
local first = tonumber(ARGV[2])
local n = #ARGV - 8
local holder = ARGV[1]
if holder ~= '' and n > 0 and last == first + n - 1 and st[4] == holder then
  return {1, last}
end
if FINAL[st[1]] then return {-2, last} end
if holder == '' then
  if redis.call('EXISTS', l) == 1 then return {-3, last} end
elseif redis.call('GET', l) ~= holder then
  return {-3, last}
end
if last ~= first - 1 then return {-4, last} end
local size = tonumber(st[3])
for i = 9, #ARGV do size = size + #ARGV[i] end
local cap = tonumber(ARGV[8])
if cap > 0 and size > cap then return {-5, last} end
local final = ARGV[4]
for i = 9, #ARGV do
  local id = '0-' .. string.format('%d', first + i - 8)
  if final ~= '' and i == #ARGV then
    redis.call('XADD', x, id, 'd', ARGV[i], 'end', final)
  else
    redis.call('XADD', x, id, 'd', ARGV[i])
  end
end
last = first + n - 1
redis.call('HSET', m, 'n', last, 'b', size)
if final ~= '' then
  redis.call('HSET', m, 's', final, 'f', ARGV[5])
  redis.call('DEL', l)
else
  if ARGV[3] ~= '' then redis.call('HSET', m, 's', ARGV[3]) end
  redis.call('PEXPIRE', l, ARGV[7])
end
redis.call('PEXPIRE', m, ARGV[6])
redis.call('PEXPIRE', x, ARGV[6])
return {1, last}
"""

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

#: KEYS m x l c r; ARGV holder lease_ms ttl_ms → {alive 0|1|-1, cancel 0|1, readers}
#: (alive -1: the record itself is gone — Redis restarted empty, or evicted it)
REFRESH = _NOW + """
local alive = 0
if redis.call('GET', KEYS[3]) == ARGV[1] then
  alive = 1
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  alive = -1
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
return {alive, redis.call('EXISTS', KEYS[4]), redis.call('ZCARD', KEYS[5])}
"""

#: KEYS r; ARGV reader lease_ms ttl_ms → 1 (a reader is attached for lease_ms more)
TOUCH = _NOW + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

#: KEYS r; ARGV reader → removed count
DETACH = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

#: KEYS l; ARGV holder → 1 released | 0 not held
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_INFO = """
local v = redis.call('HMGET', KEYS[1], 'o', 'e', 't', 's', 'n', 'f', 'm')
if not v[1] then return false end
"""
_INFO_REPLY = """
return {v[1], v[2], v[3], v[4], v[5], v[6] or '', v[7] or '', redis.call('PTTL', KEYS[2]),
        redis.call('EXISTS', KEYS[3])}
"""

#: KEYS m l c → {owner endpoint created status last finished meta lease_pttl cancel} | nil
INFO = _INFO + _INFO_REPLY

#: KEYS m l c r; ARGV reader lease_ms ttl_ms → like INFO, and the reader is attached
ATTACH = _INFO + _NOW + """
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
""" + _INFO_REPLY

#: KEYS m l c; ARGV ttl_ms channel id → like INFO; sets the flag and publishes when live
CANCEL = _FINAL + _INFO + """
if not FINAL[v[4]] then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
""" + _INFO_REPLY

#: KEYS m l c; ARGV holder lease_ms → like INFO (lease_pttl > 0 when taken) | nil
ACQUIRE = _FINAL + _INFO + """
if not FINAL[v[4]] and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', KEYS[1], 'h', ARGV[1])
else
  return {v[1], v[2], v[3], v[4], v[5], v[6] or '', v[7] or '', -3, 0}
end
""" + _INFO_REPLY

#: KEYS m l → {status last lease_pttl} | nil (what a reader checks when nothing came)
PROBE = """
local v = redis.call('HMGET', KEYS[1], 's', 'n')
if not v[1] then return false end
return {v[1], v[2], redis.call('PTTL', KEYS[2])}
"""

#: KEYS m x l c r; ARGV holder first_seq live_status final_status finished_at ttl_ms
#: lease_ms owner endpoint created meta frame... → {code, last_seq, cancel, readers}:
#: 1 written, -2 ended meanwhile, -3 another producer holds it, -4 frames missing before
#: ``first_seq`` (Redis lost some), -6 Redis is further along (an append still in flight).
#:
#: A producer that held frames in memory while Redis was unreachable writes them with
#: this, and takes its lease again (it expired meanwhile). When the record is gone (Redis
#: restarted without persistence, or the keys expired) it is made again under the same
#: id, from ``first_seq`` on: ``meta`` then carries ``kept_from`` (the frames before it are
#: lost; a reader asking for them is told the stream is not found).
RECLAIM = _FINAL + """
local m, x, l = KEYS[1], KEYS[2], KEYS[3]
local holder = ARGV[1]
local first = tonumber(ARGV[2])
local n = #ARGV - 11
local st = redis.call('HMGET', m, 's', 'n', 'b', 'h')
local last, size
if not st[1] then
  redis.call('DEL', x, l)
  local status = ARGV[3]
  if status == '' then status = 'in_progress' end
  redis.call('HSET', m, 'o', ARGV[8], 'e', ARGV[9], 't', ARGV[10], 's', status,
             'n', first - 1, 'b', 0, 'm', ARGV[11], 'h', holder)
  last, size = first - 1, 0
else
  last = tonumber(st[2])
  if FINAL[st[1]] then
    if st[4] == holder and ARGV[4] == st[1] and last == first + n - 1 then
      return {1, last, 0, 0}  -- (this very call, sent again: its reply was lost)
    end
    return {-2, last, 0, 0}
  end
  if st[4] ~= holder then return {-3, last, 0, 0} end
  local owner = redis.call('GET', l)
  if owner and owner ~= holder then return {-3, last, 0, 0} end
  if last < first - 1 then return {-4, last, 0, 0} end
  if last > first + n - 1 then return {-6, last, 0, 0} end
  size = tonumber(st[3])
end
local final = ARGV[4]
for i = 12 + (last - first + 1), #ARGV do
  size = size + #ARGV[i]
  local id = '0-' .. string.format('%d', first + i - 11)
  if final ~= '' and i == #ARGV then
    redis.call('XADD', x, id, 'd', ARGV[i], 'end', final)
  else
    redis.call('XADD', x, id, 'd', ARGV[i])
  end
end
last = first + n - 1
redis.call('HSET', m, 'n', last, 'b', size)
if final ~= '' then
  redis.call('HSET', m, 's', final, 'f', ARGV[5])
  redis.call('DEL', l)
else
  if ARGV[3] ~= '' then redis.call('HSET', m, 's', ARGV[3]) end
  redis.call('SET', l, holder, 'PX', ARGV[7])
end
redis.call('PEXPIRE', m, ARGV[6])
if redis.call('EXISTS', x) == 1 then redis.call('PEXPIRE', x, ARGV[6]) end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', redis.call('TIME')[1] * 1000)
return {1, last, redis.call('EXISTS', KEYS[4]), redis.call('ZCARD', KEYS[5])}
"""
