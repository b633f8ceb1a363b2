-- Rotation you can retry: an endpoint keeps every secret it retired in the last 24 hours (at most
-- two beside the current one), so a second `rotate-secret` within a day never drops the secret
-- that receivers still verify with. Until now it kept one previous secret only.
--
-- Expand, then contract: the old columns previous_secret and previous_secret_expires_at stay (no
-- longer written) so that relays of the previous version keep running during a rolling upgrade;
-- a later release drops them.

SET LOCAL lock_timeout = '5s';

-- The secrets retired and still signing, newest first: [{"secret": "whsec_…", "expires_at":
-- "<timestamptz>"}, …]. Entries past their expires_at no longer sign; the next rotation drops them.
ALTER TABLE endpoints
    ADD COLUMN previous_secrets jsonb NOT NULL DEFAULT '[]'::jsonb
        CHECK (jsonb_typeof(previous_secrets) = 'array'
               AND jsonb_array_length(previous_secrets) <= 2);

-- An endpoint's previous secret that still signs keeps signing, until the same time.
UPDATE endpoints
   SET previous_secrets = jsonb_build_array(
           jsonb_build_object('secret', previous_secret,
                              'expires_at', previous_secret_expires_at))
 WHERE previous_secret IS NOT NULL
   AND previous_secret_expires_at > now();

COMMENT ON COLUMN endpoints.previous_secret IS
    'Unused since migration 0008 (previous_secrets); kept for the previous release, then dropped.';
COMMENT ON COLUMN endpoints.previous_secret_expires_at IS
    'Unused since migration 0008 (previous_secrets); kept for the previous release, then dropped.';

-- The previous secrets once the current secret `retiring` gives way to `replacement`: `retiring`
-- first (it signs `keep_seconds` more), then those still signing, newest first; at most two, and
-- never `replacement` itself. `rotate-secret` and seeding (a changed CALLBACK_SIGNING_SECRET) both
-- rotate with it.
CREATE FUNCTION retire_secret(previous jsonb, retiring text, replacement text, keep_seconds float8)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_agg(kept.entry ORDER BY kept.position), '[]'::jsonb)
      FROM (SELECT candidate.entry, candidate.position
              FROM (SELECT jsonb_build_object(
                               'secret', retiring,
                               'expires_at', now() + make_interval(secs => keep_seconds)) AS entry,
                           0::bigint AS position
                     WHERE retiring IS NOT NULL
                       AND retiring IS DISTINCT FROM replacement
                    UNION ALL
                    SELECT p.entry, p.position
                      FROM jsonb_array_elements(previous) WITH ORDINALITY AS p(entry, position)
                     WHERE (p.entry ->> 'expires_at')::timestamptz > now()
                       AND p.entry ->> 'secret' IS DISTINCT FROM replacement
                       AND p.entry ->> 'secret' IS DISTINCT FROM retiring) AS candidate
             ORDER BY candidate.position
             LIMIT 2) AS kept
$$;
