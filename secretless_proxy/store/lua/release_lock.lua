-- Release a lock only if we still own it (compare-and-delete; a plain DEL could free a lock
-- that expired and was taken by another replica meanwhile).
-- KEYS[1]  the lock key, <p>lock:<key>
-- ARGV[1]  the token acquire_lock returned
-- returns  1 if the lock was ours and is released, 0 if it was not ours (expired or taken over)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
