-- Store a grant unless its id is tombstoned (a revoked id never becomes active again), index
-- it, and announce it, atomically.
-- KEYS[1]  the grant hash, <p>grant:<id>
-- KEYS[2]  the pair index, <p>grants:<pair>  (id -> expires_at ms)
-- KEYS[3]  the all-grants index, <p>grants   (id -> expires_at ms)
-- KEYS[4]  the tombstones, <p>revoked        (id -> revoked_at ms)
-- ARGV[1]  the grant id
-- ARGV[2]  the sealed grant
-- ARGV[3]  expires_at, ms since the epoch
-- ARGV[4]  now, ms since the epoch (index entries that expired before it are pruned)
-- ARGV[5]  the events channel
-- ARGV[6]  the grant_created event (JSON)
-- returns  1 if stored (and published), 0 if the id is revoked (nothing written)
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'sealed', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
for i = 2, 3 do
  redis.call('ZADD', KEYS[i], ARGV[3], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[4])
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], last[2])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
