"""Numbered, idempotent schema migrations. Each is a plain function of one connection.

`migrate` applies the missing ones in order, each in its own transaction, under an
advisory lock so that several gateways (or a gateway and the admin CLI) starting at
once never race. Never edit a migration that has shipped: add the next number.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

# Any fixed number; it only has to be the same in every process that migrates.
MIGRATION_LOCK_ID = 7_415_521_001
AUTH_CHANNEL = "llamagate_auth"
TOKEN_CHANNEL = "llamagate_tokens"
BACKENDS_CHANNEL = "llamagate_backends"  # the registry of shared backends changed
SLOTS_CHANNEL = "llamagate_slots"  # a shared backend slot was given back


async def m001_users_keys_requests(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS users (
            id bigserial PRIMARY KEY,
            username text NOT NULL UNIQUE,
            rate_limit integer CHECK (rate_limit > 0),
            is_disabled boolean NOT NULL DEFAULT false,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS api_keys (
            id bigserial PRIMARY KEY,
            key_id text NOT NULL UNIQUE,
            user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            digest bytea NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz,
            revoked_at timestamptz
        );
        CREATE INDEX IF NOT EXISTS api_keys_user_id ON api_keys (user_id);
        -- No foreign key to users: the log outlives deleted users and keys.
        CREATE TABLE IF NOT EXISTS llama_requests (
            id bigserial PRIMARY KEY,
            request_id text NOT NULL UNIQUE,
            created_at timestamptz NOT NULL,
            username text,
            key_id text,
            method text NOT NULL,
            path text NOT NULL,
            status_code integer NOT NULL,
            duration_ms double precision NOT NULL,
            queue_ms double precision,
            request_bytes bigint NOT NULL,
            response_bytes bigint NOT NULL,
            model text,
            stream boolean,
            prompt_tokens integer,
            completion_tokens integer,
            client_addr text,
            error text
        );
        CREATE INDEX IF NOT EXISTS llama_requests_created_at ON llama_requests (created_at);
        CREATE INDEX IF NOT EXISTS llama_requests_username_created_at
            ON llama_requests (username, created_at);
        """
    )


async def m002_auth_notifications(conn: asyncpg.Connection) -> None:
    # Triggers, not application code, send the notification, so a change made with
    # psql invalidates every gateway's auth cache just as the admin CLI's changes do.
    await conn.execute(
        f"""
        CREATE OR REPLACE FUNCTION llamagate_notify_auth() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{AUTH_CHANNEL}', TG_TABLE_NAME);
            RETURN NULL;
        END $$;
        DROP TRIGGER IF EXISTS users_notify_auth ON users;
        CREATE TRIGGER users_notify_auth AFTER INSERT OR UPDATE OR DELETE ON users
            FOR EACH STATEMENT EXECUTE FUNCTION llamagate_notify_auth();
        DROP TRIGGER IF EXISTS api_keys_notify_auth ON api_keys;
        CREATE TRIGGER api_keys_notify_auth AFTER INSERT OR UPDATE OR DELETE ON api_keys
            FOR EACH STATEMENT EXECUTE FUNCTION llamagate_notify_auth();
        """
    )


async def m003_shared_rate_windows(conn: asyncpg.Connection) -> None:
    # One row per user holding the admission times inside the current window. Gateways
    # called llamagate_take_slots with a whole batch of requests in one round trip (they
    # call m004's llamagate_lease_slots now; this one stays so that migrations replay as
    # shipped); the row lock makes the count exact across every gateway sharing the database.
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS rate_windows (
            username text PRIMARY KEY,
            stamps double precision[] NOT NULL DEFAULT '{}'
        );
        CREATE OR REPLACE FUNCTION llamagate_take_slots(
            p_users text[], p_wanted integer[], p_limits integer[], p_windows double precision[]
        ) RETURNS TABLE (
            username text, granted integer, used integer,
            oldest double precision, newest double precision, now_epoch double precision
        ) LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            i integer;
            kept double precision[];
            take integer;
            now_s double precision := extract(epoch FROM clock_timestamp());
        BEGIN
            -- Sorted, so that two gateways lock rows in the same order: no deadlock.
            FOR i IN SELECT ord FROM unnest(p_users) WITH ORDINALITY AS u(name, ord)
                     ORDER BY name LOOP
                INSERT INTO rate_windows AS w (username) VALUES (p_users[i])
                    ON CONFLICT (username) DO NOTHING;
                SELECT ARRAY(
                    SELECT s FROM unnest(w.stamps) AS s
                    WHERE s > now_s - p_windows[i] ORDER BY s
                ) INTO kept
                FROM rate_windows AS w WHERE w.username = p_users[i] FOR UPDATE;
                take := greatest(0, least(p_wanted[i], p_limits[i] - cardinality(kept)));
                IF take > 0 THEN
                    kept := kept || array_fill(now_s, ARRAY[take]);
                END IF;
                UPDATE rate_windows AS w SET stamps = kept WHERE w.username = p_users[i];
                username := p_users[i];
                granted := take;
                used := cardinality(kept);
                oldest := kept[1];
                newest := kept[cardinality(kept)];
                now_epoch := now_s;
                RETURN NEXT;
            END LOOP;
        END $$;
        """
    )


async def m004_rate_slot_leases(conn: asyncpg.Connection) -> None:
    # m003's llamagate_take_slots, plus leases: up to p_extra more slots per user that a gateway
    # may hand out locally for p_hold seconds without asking again. They are stamped at
    # the end of the lease (now + p_hold), the latest moment one can be used, so the
    # window never forgets a leased slot before it could have been spent: the count
    # stays exact across gateways.
    # Stamps now carry a count (NULL: 1, as m003 wrote them), so a row holds a few
    # entries per round trip instead of one per request: a busy user with a large limit
    # no longer makes every call sort and rewrite tens of thousands of stamps.
    # A crash may lose the last rate stamps, never a request row, so this transaction
    # commits without waiting for the WAL flush.
    await conn.execute(
        """
        ALTER TABLE rate_windows ADD COLUMN IF NOT EXISTS counts integer[];
        CREATE OR REPLACE FUNCTION llamagate_lease_slots(
            p_users text[], p_wanted integer[], p_extra integer[], p_limits integer[],
            p_windows double precision[], p_hold double precision
        ) RETURNS TABLE (
            username text, granted integer, leased integer, used integer,
            oldest double precision, newest double precision, now_epoch double precision
        ) LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            i integer;
            kept_stamps double precision[];
            kept_counts integer[];
            in_use integer;
            take integer;
            extra integer;
            now_s double precision := extract(epoch FROM clock_timestamp());
        BEGIN
            PERFORM set_config('synchronous_commit', 'off', true);
            -- Sorted, so that two gateways lock rows in the same order: no deadlock.
            FOR i IN SELECT ord FROM unnest(p_users) WITH ORDINALITY AS u(name, ord)
                     ORDER BY name LOOP
                INSERT INTO rate_windows AS w (username) VALUES (p_users[i])
                    ON CONFLICT (username) DO NOTHING;
                PERFORM 1 FROM rate_windows AS w WHERE w.username = p_users[i] FOR UPDATE;
                SELECT coalesce(array_agg(t.s ORDER BY t.s), '{}'),
                       coalesce(array_agg(coalesce(t.c, 1) ORDER BY t.s), '{}'),
                       coalesce(sum(coalesce(t.c, 1)), 0)
                INTO kept_stamps, kept_counts, in_use
                FROM rate_windows AS w, unnest(w.stamps, w.counts) AS t(s, c)
                WHERE w.username = p_users[i] AND t.s > now_s - p_windows[i];
                take := greatest(0, least(p_wanted[i], p_limits[i] - in_use));
                extra := greatest(0, least(p_extra[i], p_limits[i] - in_use - take));
                IF take > 0 THEN
                    kept_stamps := kept_stamps || now_s;
                    kept_counts := kept_counts || take;
                END IF;
                IF extra > 0 THEN
                    kept_stamps := kept_stamps || (now_s + p_hold);
                    kept_counts := kept_counts || extra;
                END IF;
                UPDATE rate_windows AS w SET stamps = kept_stamps, counts = kept_counts
                    WHERE w.username = p_users[i];
                username := p_users[i];
                granted := take;
                leased := extra;
                used := in_use + take + extra;
                oldest := kept_stamps[1];
                newest := kept_stamps[cardinality(kept_stamps)];
                now_epoch := now_s;
                RETURN NEXT;
            END LOOP;
        END $$;
        """
    )


async def m005_notify_on_truncate(conn: asyncpg.Connection) -> None:
    # TRUNCATE fires no row or INSERT/UPDATE/DELETE statement trigger, so before this a
    # `TRUNCATE users CASCADE` left every gateway accepting the deleted keys from its cache.
    await conn.execute(
        """
        DROP TRIGGER IF EXISTS users_notify_auth_truncate ON users;
        CREATE TRIGGER users_notify_auth_truncate AFTER TRUNCATE ON users
            FOR EACH STATEMENT EXECUTE FUNCTION llamagate_notify_auth();
        DROP TRIGGER IF EXISTS api_keys_notify_auth_truncate ON api_keys;
        CREATE TRIGGER api_keys_notify_auth_truncate AFTER TRUNCATE ON api_keys
            FOR EACH STATEMENT EXECUTE FUNCTION llamagate_notify_auth();
        """
    )


async def m006_request_repeat_count(conn: asyncpg.Connection) -> None:
    # Repeated anonymous refusals (401, 404) from one client are folded into one row
    # (proxy/refusals.py); this says how many requests the row stands for. A constant
    # default: no table rewrite, instant even on a large log.
    await conn.execute(
        """
        ALTER TABLE llama_requests
            ADD COLUMN IF NOT EXISTS repeat_count integer NOT NULL DEFAULT 1
            CHECK (repeat_count >= 1)
        """
    )


async def m007_token_limits(conn: asyncpg.Connection) -> None:
    # Token limits and quotas (proxy/tokenlimit.py). Per user: NULL takes the gateway's
    # default, 0 is unlimited. token_windows holds each user's charges of the last minute
    # as stamps with token counts (as rate_windows holds admissions); token_days the
    # tokens charged per UTC day, the day chosen by the gateway's clock, so that a
    # month's use is the sum of its days. Every charge notifies TOKEN_CHANNEL with the
    # charging gateway's id, so that other gateways know the user is shared and ask the
    # database before admitting them (see proxy/tokenlimit.py). As m004, a crash may lose
    # the last charges, never a request row: no wait for the WAL flush.
    await conn.execute(
        f"""
        ALTER TABLE users
            ADD COLUMN IF NOT EXISTS tokens_per_minute integer CHECK (tokens_per_minute >= 0),
            ADD COLUMN IF NOT EXISTS daily_token_quota bigint CHECK (daily_token_quota >= 0),
            ADD COLUMN IF NOT EXISTS monthly_token_quota bigint
                CHECK (monthly_token_quota >= 0);
        CREATE TABLE IF NOT EXISTS token_windows (
            username text PRIMARY KEY,
            stamps double precision[] NOT NULL DEFAULT '{{}}',
            counts bigint[] NOT NULL DEFAULT '{{}}'
        );
        CREATE TABLE IF NOT EXISTS token_days (
            username text NOT NULL,
            day date NOT NULL,
            tokens bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (username, day)
        );
        CREATE OR REPLACE FUNCTION llamagate_charge_tokens(
            p_users text[], p_tokens bigint[], p_days date[], p_window double precision,
            p_gateway text
        ) RETURNS TABLE (
            username text, day date, stamps double precision[], counts bigint[],
            day_used bigint, month_used bigint, now_epoch double precision
        ) LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            i integer;
            kept_stamps double precision[];
            kept_counts bigint[];
            month_start date;
            n integer;
            now_s double precision := extract(epoch FROM clock_timestamp());
        BEGIN
            PERFORM set_config('synchronous_commit', 'off', true);
            -- Sorted, so that two gateways lock rows in the same order: no deadlock.
            FOR i IN SELECT ord FROM unnest(p_users) WITH ORDINALITY AS u(name, ord)
                     ORDER BY name, ord LOOP
                INSERT INTO token_windows AS w (username) VALUES (p_users[i])
                    ON CONFLICT (username) DO NOTHING;
                PERFORM 1 FROM token_windows AS w WHERE w.username = p_users[i] FOR UPDATE;
                SELECT coalesce(array_agg(t.s ORDER BY t.s), '{{}}'),
                       coalesce(array_agg(t.c ORDER BY t.s), '{{}}')
                INTO kept_stamps, kept_counts
                FROM token_windows AS w, unnest(w.stamps, w.counts) AS t(s, c)
                WHERE w.username = p_users[i] AND t.s > now_s - p_window;
                IF p_tokens[i] > 0 THEN
                    -- Charges within one tenth of a second share an entry, stamped with
                    -- the latest: at most 600 entries a minute, however busy the user.
                    n := cardinality(kept_stamps);
                    IF n > 0 AND floor(kept_stamps[n] * 10) = floor(now_s * 10) THEN
                        kept_stamps[n] := now_s;
                        kept_counts[n] := kept_counts[n] + p_tokens[i];
                    ELSE
                        kept_stamps := kept_stamps || now_s;
                        kept_counts := kept_counts || p_tokens[i];
                    END IF;
                    INSERT INTO token_days AS d (username, day, tokens)
                        VALUES (p_users[i], p_days[i], p_tokens[i])
                        ON CONFLICT (username, day)
                        DO UPDATE SET tokens = d.tokens + excluded.tokens;
                    PERFORM pg_notify('{TOKEN_CHANNEL}', p_gateway || ' ' || p_users[i]);
                END IF;
                UPDATE token_windows AS w SET stamps = kept_stamps, counts = kept_counts
                    WHERE w.username = p_users[i];
                month_start := date_trunc('month', p_days[i])::date;
                username := p_users[i];
                day := p_days[i];
                stamps := kept_stamps;
                counts := kept_counts;
                SELECT coalesce(sum(d.tokens) FILTER (WHERE d.day = p_days[i]), 0),
                       coalesce(sum(d.tokens), 0)
                INTO day_used, month_used
                FROM token_days AS d
                WHERE d.username = p_users[i] AND d.day >= month_start
                  AND d.day < (month_start + interval '1 month')::date;
                now_epoch := now_s;
                RETURN NEXT;
            END LOOP;
        END $$;
        """
    )


async def m008_user_concurrency_limit(conn: asyncpg.Connection) -> None:
    # How many of a user's requests may be at the backend at once: NULL follows
    # LLAMA_PROXY_USER_CONCURRENCY, 0 is no cap. An UPDATE of users already notifies every
    # gateway (m002), so a change reaches their auth caches, and the caps with them.
    # (Number 7 belongs to the token quotas, written on another branch at the same time.)
    await conn.execute(
        """
        ALTER TABLE users ADD COLUMN IF NOT EXISTS concurrency_limit integer
            CHECK (concurrency_limit >= 0)
        """
    )


async def m009_token_charge_replays(conn: asyncpg.Connection) -> None:
    # Token charges spooled during an outage are replayed exactly once
    # (proxy/chargebacklog.py): the id of each spooled batch is inserted here in the
    # transaction that applies its charges, so a batch sent again (a crash between that
    # commit and the spool's offset) is refused. The gateway deletes the ids once its
    # offset is saved; a crash in between leaves a few behind, harmless (never reused).
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS token_charge_replays (
            batch_id text PRIMARY KEY,
            replayed_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


async def m010_shared_backends(conn: asyncpg.Connection) -> None:
    # The pool's members on other hosts, shared by every gateway on this database
    # (admin add-backend). sealed_key is the backend's internal key sealed with the
    # gateways' LLAMA_PROXY_BACKEND_SECRET (proxy/sealing.py), never the key itself.
    # state: active takes requests; draining finishes what it runs and takes nothing new;
    # refused was taken out by a gateway (it serves another model; problem says why).
    #
    # One row per slot in llama_backend_slots: a gateway holding a slot has its id in
    # gateway_id, so two gateways never send two requests at once to one slot. A slot
    # whose holder has not been seen in llama_gateways for a few seconds is free again
    # (a gateway killed or cut off from the database). The slot rows also keep the
    # figures list-backends sums per backend. waiting_since orders the gateways that wait
    # for a slot, so one busy gateway cannot starve another.
    await conn.execute(
        f"""
        CREATE TABLE IF NOT EXISTS llama_backends (
            id bigserial PRIMARY KEY,
            name text NOT NULL UNIQUE,
            url text NOT NULL UNIQUE,
            concurrency integer NOT NULL DEFAULT 1 CHECK (concurrency >= 1),
            sealed_key text NOT NULL DEFAULT '',
            model text NOT NULL DEFAULT '',
            state text NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'draining', 'refused')),
            problem text NOT NULL DEFAULT '',
            added_at timestamptz NOT NULL DEFAULT now(),
            changed_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS llama_backend_slots (
            backend_id bigint NOT NULL REFERENCES llama_backends (id) ON DELETE CASCADE,
            slot integer NOT NULL CHECK (slot >= 0),
            gateway_id text,
            leased_at timestamptz,
            last_used timestamptz,
            requests bigint NOT NULL DEFAULT 0,
            errors bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (backend_id, slot)
        );
        CREATE INDEX IF NOT EXISTS llama_backend_slots_holder
            ON llama_backend_slots (gateway_id) WHERE gateway_id IS NOT NULL;
        CREATE TABLE IF NOT EXISTS llama_gateways (
            gateway_id text PRIMARY KEY,
            host text NOT NULL DEFAULT '',
            started_at timestamptz NOT NULL DEFAULT now(),
            last_seen timestamptz NOT NULL DEFAULT now(),
            waiting_since timestamptz
        );
        CREATE OR REPLACE FUNCTION llamagate_notify_backends() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{BACKENDS_CHANNEL}', TG_OP);
            RETURN NULL;
        END $$;
        DROP TRIGGER IF EXISTS llama_backends_notify ON llama_backends;
        CREATE TRIGGER llama_backends_notify
            AFTER INSERT OR DELETE OR TRUNCATE
                OR UPDATE OF name, url, concurrency, sealed_key, model, state
            ON llama_backends
            FOR EACH STATEMENT EXECUTE FUNCTION llamagate_notify_backends();
        """
    )


async def m011_take_slot_function(conn: asyncpg.Connection) -> None:
    # Taking a shared slot (proxy/slotstore.py) is on the request path. As a plain
    # statement PostgreSQL plans its CTEs afresh on each execution (custom plans), about
    # 0.5 ms of a 1.2 ms take on the 2-core box; in a function, with a generic plan
    # forced, the plan is made once per connection (0.73 ms in all). The rule it keeps:
    # a free slot (no holder, or one not seen for p_lease seconds), taken only if no live
    # gateway has waited longer than this one; see proxy/slotstore.py.
    await conn.execute(
        """
        CREATE OR REPLACE FUNCTION llamagate_take_slot(
            p_gateway text, p_backends bigint[], p_lease double precision,
            p_still_waiting boolean, OUT taken_backend bigint, OUT taken_slot integer)
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
        BEGIN
            WITH me AS (
                SELECT coalesce((SELECT g.waiting_since FROM llama_gateways g
                                 WHERE g.gateway_id = p_gateway), now()) AS since
            ), older_waiter AS (
                SELECT 1 FROM llama_gateways g, me
                WHERE g.gateway_id <> p_gateway AND g.waiting_since < me.since
                  AND g.last_seen > now() - make_interval(secs => p_lease)
                LIMIT 1
            ), free AS (
                SELECT s.backend_id, s.slot FROM llama_backend_slots s
                WHERE s.backend_id = ANY(p_backends)
                  AND NOT EXISTS (SELECT 1 FROM older_waiter)
                  AND (s.gateway_id IS NULL OR NOT EXISTS (
                      SELECT 1 FROM llama_gateways h
                      WHERE h.gateway_id = s.gateway_id
                        AND h.last_seen > now() - make_interval(secs => p_lease)))
                ORDER BY s.last_used NULLS FIRST, s.backend_id, s.slot
                LIMIT 1
                FOR UPDATE OF s SKIP LOCKED
            ), taken AS (
                UPDATE llama_backend_slots s SET gateway_id = p_gateway, leased_at = now()
                FROM free WHERE s.backend_id = free.backend_id AND s.slot = free.slot
                RETURNING s.backend_id, s.slot
            ), turn AS (
                UPDATE llama_gateways g
                SET waiting_since = CASE WHEN p_still_waiting THEN now() END
                WHERE g.gateway_id = p_gateway AND EXISTS (SELECT 1 FROM taken)
                  AND (g.waiting_since IS NOT NULL OR p_still_waiting)
            )
            SELECT t.backend_id, t.slot INTO taken_backend, taken_slot FROM taken t;
        END $$;
        """
    )


async def m012_take_slot_after_restart(conn: asyncpg.Connection) -> None:
    # The leases commit asynchronously (proxy/app.py: the lease pool), so a PostgreSQL
    # crash can lose the last ~0.6 s of them. A lost take shows a slot free that a live
    # gateway still uses: for p_lease seconds after the server started, no slot is taken,
    # which leaves its holder the time to write it back (proxy/sharedslots.py reconciles
    # on the first heartbeat that sees the new start time). Only if a gateway was there
    # before the start (its row is older), so a new cluster serves at once: a take needs
    # a heartbeat first, and a gateway's first one commits synchronously. As m011 else.
    await conn.execute(
        """
        CREATE OR REPLACE FUNCTION llamagate_take_slot(
            p_gateway text, p_backends bigint[], p_lease double precision,
            p_still_waiting boolean, OUT taken_backend bigint, OUT taken_slot integer)
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
        BEGIN
            -- The grace after a restart: a take lost with the crash may be in use.
            IF now() < pg_postmaster_start_time() + make_interval(secs => p_lease)
               AND EXISTS (SELECT 1 FROM llama_gateways g
                           WHERE g.last_seen < pg_postmaster_start_time()) THEN
                RETURN;
            END IF;
            WITH me AS (
                SELECT coalesce((SELECT g.waiting_since FROM llama_gateways g
                                 WHERE g.gateway_id = p_gateway), now()) AS since
            ), older_waiter AS (
                SELECT 1 FROM llama_gateways g, me
                WHERE g.gateway_id <> p_gateway AND g.waiting_since < me.since
                  AND g.last_seen > now() - make_interval(secs => p_lease)
                LIMIT 1
            ), free AS (
                SELECT s.backend_id, s.slot FROM llama_backend_slots s
                WHERE s.backend_id = ANY(p_backends)
                  AND NOT EXISTS (SELECT 1 FROM older_waiter)
                  AND (s.gateway_id IS NULL OR NOT EXISTS (
                      SELECT 1 FROM llama_gateways h
                      WHERE h.gateway_id = s.gateway_id
                        AND h.last_seen > now() - make_interval(secs => p_lease)))
                ORDER BY s.last_used NULLS FIRST, s.backend_id, s.slot
                LIMIT 1
                FOR UPDATE OF s SKIP LOCKED
            ), taken AS (
                UPDATE llama_backend_slots s SET gateway_id = p_gateway, leased_at = now()
                FROM free WHERE s.backend_id = free.backend_id AND s.slot = free.slot
                RETURNING s.backend_id, s.slot
            ), turn AS (
                UPDATE llama_gateways g
                SET waiting_since = CASE WHEN p_still_waiting THEN now() END
                WHERE g.gateway_id = p_gateway AND EXISTS (SELECT 1 FROM taken)
                  AND (g.waiting_since IS NOT NULL OR p_still_waiting)
            )
            SELECT t.backend_id, t.slot INTO taken_backend, taken_slot FROM taken t;
        END $$;
        """
    )


Migration = Callable[[asyncpg.Connection], Awaitable[None]]
MIGRATIONS: tuple[tuple[int, Migration], ...] = (
    (1, m001_users_keys_requests),
    (2, m002_auth_notifications),
    (3, m003_shared_rate_windows),
    (4, m004_rate_slot_leases),
    (5, m005_notify_on_truncate),
    (6, m006_request_repeat_count),
    (7, m007_token_limits),
    (8, m008_user_concurrency_limit),
    (9, m009_token_charge_replays),
    (10, m010_shared_backends),
    (11, m011_take_slot_function),
    (12, m012_take_slot_after_restart),
)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the missing migrations in order; return the numbers applied."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, migration in MIGRATIONS:
            if version in done:
                continue
            async with conn.transaction():
                await migration(conn)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


async def schema_version(conn: asyncpg.Connection) -> int:
    """The newest migration applied, 0 for an empty database."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
