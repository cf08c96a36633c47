-- The candidate grants of one (workload, rule) pair, in one round trip.
-- KEYS[1]  the pair index, <p>grants:<pair>  (id -> expires_at ms)
-- KEYS[2]  the tombstones, <p>revoked        (id -> revoked_at ms)
-- ARGV[1]  now, ms since the epoch
-- ARGV[2]  the grant key prefix, <p>grant:
-- returns  a flat list id1, sealed1, id2, sealed2, ... of grants that have not expired, are not
--          tombstoned and carry no revoked_at (the caller still opens, checks and filters them).
--          Reads <p>grant:<id> keys not named in KEYS: fine on one Redis or Sentinel, not Cluster.
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  if not redis.call('ZSCORE', KEYS[2], id) then
    local rec = redis.call('HMGET', ARGV[2] .. id, 'sealed', 'revoked_at')
    if rec[1] and not rec[2] then
      table.insert(out, id)
      table.insert(out, rec[1])
    end
  end
end
return out
