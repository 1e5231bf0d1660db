"""The demo blog against a real PostgreSQL database and a real Redis."""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from exporter.cache import CachingService
from exporter.demo import blog
from exporter.demo.blog import (
    CachedUserRepository,
    asyncpg_url,
    create_schema,
    run_workload,
    seed_data,
)
from exporter.demo.servers import PostgresCluster


@pytest.fixture
async def blog_engine(pg: PostgresCluster) -> AsyncIterator[AsyncEngine]:
    name = f"blog_{secrets.token_hex(4)}"
    pg.psql(f"CREATE DATABASE {name}")
    engine = create_async_engine(asyncpg_url(pg.dsn_for(db=name)))
    try:
        await create_schema(engine)
        await seed_data(engine, users=120, posts=600, follows=400)
        yield engine
    finally:
        await engine.dispose()
        pg.psql(f"DROP DATABASE {name} WITH (FORCE)")


async def test_schema_has_the_seed_indexes_and_an_unused_one(blog_engine: AsyncEngine) -> None:
    async with blog_engine.connect() as conn:
        rows = (await conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"))).all()
    defs = {r.indexname: r.indexdef for r in rows}
    assert "WHERE (is_deleted = false)" in defs["idx_posts_author_published_created"]
    assert "WHERE ((is_published = true) AND (is_deleted = false))" in defs["idx_posts_published_only"]
    assert "USING gin (tags)" in defs["idx_posts_tags_gin"]
    assert "(((like_count * 2))::numeric + ((view_count)::numeric * 0.1))" in defs["idx_posts_engagement_score"]
    assert "(status, is_active, created_at) WHERE (is_deleted = false)" in defs["idx_users_search_composite"]
    assert "lower((username)::text)" in defs["idx_users_username_lower_unused"]


async def test_repository_is_kept_fresh_by_bind_without_invalidation_calls(
    blog_engine: AsyncEngine, redis_url: str
) -> None:
    sessions = async_sessionmaker(blog_engine, expire_on_commit=False)
    async with CachingService(redis_url) as cache:
        repo = CachedUserRepository(sessions, cache)
        async with blog_engine.connect() as conn:
            expected = (await conn.execute(text(
                "SELECT (SELECT count(*) FROM posts WHERE author_id = 1 AND NOT is_deleted) AS posts,"
                " (SELECT count(*) FROM user_follows WHERE following_id = 1) AS followers,"
                " (SELECT coalesce(sum(like_count), 0) FROM posts WHERE author_id = 1 AND NOT is_deleted) AS likes"
            ))).one()
        got = {uid: await repo.get_user_with_stats_cached(uid) for uid in (1, 10, 100)}
        one = got[1]
        assert one is not None
        assert one["user"]["username"] == "user1"
        assert one["stats"]["post_count"] == expected.posts > 0
        assert one["stats"]["follower_count"] == expected.followers > 0  # not multiplied by posts
        assert one["stats"]["total_likes"] == expected.likes
        assert isinstance(one["user"]["created_at"], str)
        assert cache.stats.pending()["misses|user_stats"] == 3
        assert await repo.get_user_with_stats_cached(1) == one
        assert cache.stats.pending()["hits|user_stats"] == 1

        # A like on one of user 1's posts (a commit through the bound sessions) drops user 1's
        # entry, and only that; the popular list (a like count is a declared counter) stays.
        assert await repo.get_popular_posts_cached(5)
        async with blog_engine.connect() as conn:
            post_id = (await conn.execute(text(
                "SELECT id FROM posts WHERE author_id = 1 AND NOT is_deleted ORDER BY id LIMIT 1"))).scalar_one()
        assert await repo.like_post(post_id) == 1
        k = {uid: cache.key("user_stats", {"user_id": uid}) for uid in (1, 10, 100)}
        assert await cache.redis.exists(k[1]) == 0
        assert await cache.redis.exists(k[10], k[100]) == 2
        assert await cache.redis.exists(cache.key("popular_posts", {"limit": 5})) == 1
        await cache.invalidate_namespace("popular_posts")
        fresh = await repo.get_user_with_stats_cached(1)
        assert fresh is not None and fresh["stats"]["total_likes"] == expected.likes + 1

        popular = await repo.get_popular_posts_cached(5)
        assert len(popular) == 5
        scores = [p["like_count"] * 2 + p["view_count"] * 0.1 for p in popular]
        assert scores == sorted(scores, reverse=True)
        assert await repo.get_popular_posts_cached(5) == popular
        assert cache.stats.pending()["hits|popular_posts"] == 1
        assert await repo.get_user_with_stats_cached(10**9) is None

        await repo.create_post(10, "new one", ["fresh"])
        assert await cache.redis.exists(k[10]) == 0
        assert await cache.redis.exists(cache.key("popular_posts", {"limit": 5})) == 0
        assert await repo.posts_with_tag("fresh")
        assert not hasattr(repo, "invalidate_user_cache")  # the application never invalidates
        src = inspect.getsource(blog)
        repository = src.split("class CachedUserRepository", 1)[1].split("async def run_workload")[0]
        assert ".invalidate" not in repository


async def test_workload_exercises_everything(blog_engine: AsyncEngine, redis_url: str) -> None:
    stop = asyncio.Event()
    async with CachingService(redis_url, stats_key="demo:stats") as cache:
        task = asyncio.create_task(run_workload(blog_engine, cache, stop=stop, rate=200, seed=7))
        await asyncio.sleep(2.0)
        stop.set()
        done = await asyncio.wait_for(task, 5)
    async with aredis.Redis.from_url(redis_url) as r:  # after close() flushed everything
        stats = {k.decode(): float(v) for k, v in (await r.hgetall("demo:stats")).items()
                 if not k.startswith(b"flush")}
    assert "failed" not in done, done
    assert done.get("user_stats", 0) > 10 and done.get("slow", 0) >= 1 and done.get("like", 0) >= 1
    assert stats.get("hits|user_stats", 0) > 0 and stats.get("loads|user_stats", 0) > 0
    invalidations = sum(v for k, v in stats.items() if k.startswith("invalidations|"))
    assert invalidations >= done["like"] + done.get("new_post", 0)
