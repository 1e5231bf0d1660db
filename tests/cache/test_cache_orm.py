"""The seed-shaped application on SQLAlchemy 2.0 async sessions, against a real PostgreSQL and a
real Redis, kept fresh by ``cache.bind(...)``: the application code never invalidates."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Numeric,
    String,
    create_engine,
    func,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from exporter.cache import CachingService
from exporter.cache.orm import row_tags, table_tag, tables_read
from exporter.demo.blog import asyncpg_url
from exporter.demo.servers import PostgresCluster


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="active")
    balance: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal("0.00"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    title: Mapped[str] = mapped_column(String(200))
    like_count: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class UserFollow(Base):
    __tablename__ = "user_follows"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    follower_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    following_id: Mapped[int] = mapped_column(ForeignKey("users.id"))


class CachedUserRepository:
    """What the seed's repository becomes: reads through the cache, writes through the session,
    and not one invalidation call."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], cache: CachingService) -> None:
        self.sessions = sessions
        self.cache = cache
        self.loads = 0

    async def get_user_with_stats(self, user_id: int) -> dict[str, Any] | None:
        self.loads += 1
        async with self.sessions() as s:
            user = await s.get(User, user_id)
            if user is None:
                return None
            posts = (await s.execute(
                select(func.count(Post.id), func.coalesce(func.sum(Post.like_count), 0))
                .where(Post.author_id == user_id))).one()
            followers = await s.scalar(select(func.count()).where(UserFollow.following_id == user_id))
        return {
            "user": {"id": user.id, "username": user.username, "status": user.status,
                     "balance": user.balance, "created_at": user.created_at},
            "stats": {"post_count": posts[0], "total_likes": int(posts[1]), "follower_count": followers},
        }

    async def get_user_with_stats_cached(self, user_id: int) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self.cache.get_or_load(
            "user_stats", {"user_id": user_id}, lambda: self.get_user_with_stats(user_id),
            ttl=300, tags=row_tags(User, user_id),
        )
        return result

    async def get_popular_posts_cached(self, limit: int = 10) -> list[dict[str, Any]]:
        stmt = (
            select(Post.id, Post.title, User.username.label("author_username"), Post.like_count, Post.created_at)
            .join(User, Post.author_id == User.id)
            .order_by(Post.like_count.desc(), Post.id)
            .limit(limit)
        )
        async with self.sessions() as s:
            return await self.cache.query(s, stmt, ttl=600, namespace="popular_posts")

    async def create_post(self, author_id: int, title: str, likes: int = 0) -> int:
        async with self.sessions.begin() as s:
            post = Post(author_id=author_id, title=title, like_count=likes)
            s.add(post)
            await s.flush()
            return post.id


@pytest.fixture
async def app_engine(pg: PostgresCluster) -> AsyncIterator[AsyncEngine]:
    name = f"orm_{secrets.token_hex(4)}"
    pg.psql(f"CREATE DATABASE {name}")
    engine = create_async_engine(asyncpg_url(pg.dsn_for(db=name)))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine).begin() as s:
            s.add_all([User(id=i, username=f"user{i}", balance=Decimal("10.50")) for i in (1, 2, 3)])
            await s.flush()
            s.add_all([Post(author_id=1 + i % 3, title=f"post {i}", like_count=i) for i in range(10)])
            s.add_all([UserFollow(follower_id=2, following_id=1), UserFollow(follower_id=3, following_id=1)])
        yield engine
    finally:
        await engine.dispose()
        pg.psql(f"DROP DATABASE {name} WITH (FORCE)")


async def test_bound_sessions_keep_the_seed_repository_fresh(app_engine: AsyncEngine, redis_url: str) -> None:
    sessions = async_sessionmaker(app_engine, expire_on_commit=False)
    async with CachingService(redis_url=redis_url, stats_flush_interval=3600) as cache:
        cache.bind(sessions)
        repo = CachedUserRepository(sessions, cache)

        # Hit and miss give the same value, type for type (datetime, Decimal), from the first call.
        first = await repo.get_user_with_stats_cached(1)
        again = await repo.get_user_with_stats_cached(1)
        assert first == again and first is not None and again is not None
        assert isinstance(again["user"]["created_at"], dt.datetime) and again["user"]["created_at"].tzinfo
        assert again["user"]["balance"] == Decimal("10.50") and str(again["user"]["balance"]) == "10.50"
        assert again["stats"] == {"post_count": 4, "total_likes": 0 + 3 + 6 + 9, "follower_count": 2}
        assert await repo.get_user_with_stats_cached(2) is not None
        assert repo.loads == 2

        popular = await repo.get_popular_posts_cached(3)
        assert [p["title"] for p in popular] == ["post 9", "post 8", "post 7"]
        assert await repo.get_popular_posts_cached(3) == popular
        assert isinstance(popular[0]["created_at"], dt.datetime)
        popular_key = await _popular_key(cache)
        assert popular_key
        assert cache.stats.pending()["hits|popular_posts"] == 1

        # 1. A post created through the session: the next popular-posts read is fresh, and the
        # author's stats too (the post's foreign key names user 2); user 1's entry stays.
        new_id = await repo.create_post(2, "a hit", likes=100)
        assert await cache.redis.exists(popular_key) == 0
        fresh = await repo.get_popular_posts_cached(3)
        assert fresh[0]["id"] == new_id and fresh[0]["author_username"] == "user2"
        assert await cache.redis.exists(cache.key("user_stats", {"user_id": 2})) == 0
        assert await cache.redis.exists(cache.key("user_stats", {"user_id": 1})) == 1
        stats2 = await repo.get_user_with_stats_cached(2)
        assert stats2 is not None and stats2["stats"]["total_likes"] == 1 + 4 + 7 + 100

        # 2. A write rolled back: the entries stay, and the next reads are hits.
        loads = repo.loads
        async with sessions() as s:
            s.add(Post(author_id=1, title="never", like_count=1000))
            user = await s.get(User, 1)
            assert user is not None
            user.username = "renamed"
            await s.flush()  # the rows were written in the transaction ...
            await s.rollback()  # ... and undone
        popular_key = await _popular_key(cache)
        assert await cache.redis.exists(popular_key) == 1
        assert await repo.get_popular_posts_cached(3) == fresh
        assert await repo.get_user_with_stats_cached(1) == first
        assert repo.loads == loads

        # An ORM update of one row drops that user's entries only.
        await repo.get_user_with_stats_cached(3)
        async with sessions.begin() as s:
            u3 = await s.get(User, 3)
            assert u3 is not None
            u3.status = "away"
        assert await cache.redis.exists(cache.key("user_stats", {"user_id": 3})) == 0
        assert await cache.redis.exists(cache.key("user_stats", {"user_id": 1})) == 1
        assert await _popular_key(cache) == ""  # it read the users table
        await repo.get_user_with_stats_cached(3)
        await repo.get_popular_posts_cached(3)
        popular_key = await _popular_key(cache)

        # 3. A bulk update() of users invalidates every user entry (and what read the table).
        keys = [cache.key("user_stats", {"user_id": u}) for u in (1, 2, 3)]
        assert await cache.redis.exists(*keys) == 3
        async with sessions.begin() as s:
            await s.execute(update(User).values(status="suspended"))
        assert await cache.redis.exists(*keys) == 0
        assert await cache.redis.exists(popular_key) == 0
        got = await repo.get_user_with_stats_cached(1)
        assert got is not None and got["user"]["status"] == "suspended"

        # Counted like any invalidation, per namespace.
        pending = cache.stats.pending()
        assert pending["invalidated_keys|user_stats"] == 1 + 1 + 3  # user 2, user 3, the bulk
        assert pending["invalidated_keys|popular_posts"] == 3


async def _popular_key(cache: CachingService) -> str:
    return next(iter([k.decode() async for k in cache.redis.scan_iter(match="pgcache:{popular_posts}:*")] or [""]))


async def test_counter_columns_leave_lists_alone_but_not_rows(app_engine: AsyncEngine, redis_url: str) -> None:
    sessions = async_sessionmaker(app_engine, expire_on_commit=False)
    async with CachingService(redis_url, stats_flush_interval=3600) as cache:
        cache.bind(sessions, counters=[Post.like_count])
        repo = CachedUserRepository(sessions, cache)
        await repo.get_popular_posts_cached(3)
        await repo.get_user_with_stats_cached(1)
        await repo.get_user_with_stats_cached(2)
        async with sessions.begin() as s:
            post = await s.get(Post, 1)  # post 0 of user 1... ids start at 1: author 1 + 0 % 3
            assert post is not None and post.author_id == 1
            post.like_count = Post.like_count + 1
        assert await cache.redis.exists(await _popular_key(cache)) == 1  # a like: not the list
        assert await cache.redis.exists(cache.key("user_stats", {"user_id": 1})) == 0  # the author
        assert await cache.redis.exists(cache.key("user_stats", {"user_id": 2})) == 1
        async with sessions.begin() as s:
            post = await s.get(Post, 1)
            assert post is not None
            post.title = "retitled"  # not a counter: the list goes too
        assert await _popular_key(cache) == ""

        # A bulk update of posts cannot say whose posts changed: every user entry goes.
        await repo.get_user_with_stats_cached(1)
        assert await cache.redis.exists(cache.key("user_stats", {"user_id": 2})) == 1
        async with sessions.begin() as s:
            await s.execute(update(Post).where(Post.id == 5).values(title="bulk"))
        keys = [cache.key("user_stats", {"user_id": u}) for u in (1, 2)]
        assert await cache.redis.exists(*keys) == 0

        # SQL text is not seen (documented): the entry stays until invalidated by hand.
        await repo.get_user_with_stats_cached(1)
        async with sessions.begin() as s:
            await s.execute(text("UPDATE users SET username = 'raw' WHERE id = 1"))
        assert await cache.redis.exists(keys[0]) == 1

        # Only the bound factory's sessions invalidate.
        other = async_sessionmaker(app_engine)
        async with other.begin() as s:
            u1 = await s.get(User, 1)
            assert u1 is not None
            u1.status = "elsewhere"
        assert await cache.redis.exists(keys[0]) == 1
        assert await cache.invalidate_tags(table_tag(User)) == 0  # nothing read the whole table
        assert await cache.invalidate_tags(*row_tags(User, 1)) == 1


async def test_query_tags_every_table_it_reads(app_engine: AsyncEngine) -> None:
    sub = select(func.count()).where(UserFollow.following_id == User.id).scalar_subquery()
    stmt = select(Post.title, User.username, sub.label("followers")).join(User, Post.author_id == User.id)
    assert tables_read(stmt) == ["posts", "user_follows", "users"]
    with pytest.raises(TypeError, match="async_sessionmaker"):
        CachingService().bind(app_engine)


async def test_sync_sessions_invalidate_too(app_engine: AsyncEngine, redis_url: str) -> None:
    url = app_engine.url.set(drivername="postgresql+psycopg")
    engine = create_engine(url)
    sync_sessions = sessionmaker(engine, expire_on_commit=False)
    try:
        async with CachingService(redis_url, stats_flush_interval=3600) as cache:
            cache.bind(sync_sessions)
            repo = CachedUserRepository(async_sessionmaker(app_engine), cache)

            def rename(user_id: int, name: str) -> None:
                with sync_sessions.begin() as s:
                    user = s.get(User, user_id)
                    assert user is not None
                    user.username = name

            # From a worker thread (the usual home of sync code in an async app): the commit
            # waits for the invalidation on the cache's event loop.
            await repo.get_user_with_stats_cached(1)
            await asyncio.to_thread(rename, 1, "from-thread")
            assert await cache.redis.exists(cache.key("user_stats", {"user_id": 1})) == 0
            got = await repo.get_user_with_stats_cached(1)
            assert got is not None and got["user"]["username"] == "from-thread"

            # On the event loop's own thread it cannot wait: the invalidation runs right after.
            await repo.get_user_with_stats_cached(2)
            rename(2, "on-loop")
            await asyncio.sleep(0.2)
            assert await cache.redis.exists(cache.key("user_stats", {"user_id": 2})) == 0

            # A rollback in a sync session invalidates nothing.
            await repo.get_user_with_stats_cached(3)
            with sync_sessions() as s:
                user = s.get(User, 3)
                assert user is not None
                user.username = "never"
                s.flush()
                s.rollback()
            await asyncio.sleep(0.1)
            assert await cache.redis.exists(cache.key("user_stats", {"user_id": 3})) == 1
    finally:
        engine.dispose()


async def test_query_keys_follow_the_bound_values(app_engine: AsyncEngine, redis_url: str) -> None:
    sessions = async_sessionmaker(app_engine)
    async with CachingService(redis_url, stats_flush_interval=3600) as cache:
        async with sessions() as s:
            def titles(author: int, limit: int) -> Any:
                return select(Post.title).where(Post.author_id == author).order_by(Post.id).limit(limit)

            one = await cache.query(s, titles(1, 2), ttl=60)
            two = await cache.query(s, titles(2, 2), ttl=60)
            assert [r["title"] for r in one] == ["post 0", "post 3"]
            assert [r["title"] for r in two] == ["post 1", "post 4"]
            assert await cache.query(s, titles(1, 2), ttl=60) == one
            assert await cache.query(s, titles(1, 3), ttl=60) != one
            pending = cache.stats.pending()
            assert (pending["misses|query"], pending["hits|query"]) == (3, 1)
