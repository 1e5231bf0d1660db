"""The blog of the seed design, fixed: typed SQLAlchemy 2.0 models, the seed's five indexes (plus
one nobody uses, for the unused-index panel), a cached repository that returns plain data and is
kept fresh by ``cache.bind()`` (no invalidation call anywhere), and a steady workload that gives every dashboard something to show.

All SQL is bound parameters or SQLAlchemy expressions; no value is ever formatted into SQL text.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Select,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    literal_column,
    select,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from ..cache import CachingService
from ..cache.orm import row_tags, table_tag

__all__ = [
    "SEED_INDEXES",
    "Base",
    "CachedUserRepository",
    "Post",
    "User",
    "UserFollow",
    "asyncpg_url",
    "create_schema",
    "popular_posts_query",
    "run_demo_workload",
    "run_workload",
    "seed_data",
]

log = logging.getLogger(__name__)


# The seed design's five indexes; the repository's queries use each of them.
SEED_INDEXES = (
    "idx_posts_author_published_created",
    "idx_posts_published_only",
    "idx_posts_tags_gin",
    "idx_posts_engagement_score",
    "idx_users_search_composite",
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    is_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        # The seed's users composite partial index.
        Index(
            "idx_users_search_composite", "status", "is_active", "created_at",
            postgresql_where=text("is_deleted = false"),
        ),
        # Deliberately unused: no query filters on lower(username). The unused-index panel shows it.
        Index("idx_users_username_lower_unused", func.lower(username)),
    )


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text, default="")
    is_published: Mapped[bool] = mapped_column(Boolean, default=False)
    is_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    like_count: Mapped[int] = mapped_column(Integer, default=0)
    view_count: Mapped[int] = mapped_column(Integer, default=0)
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        Index(
            "idx_posts_author_published_created", "author_id", "is_published", "created_at",
            postgresql_where=text("is_deleted = false"),
        ),
        Index(
            "idx_posts_published_only", "created_at",
            postgresql_where=text("is_published = true AND is_deleted = false"),
        ),
        Index("idx_posts_tags_gin", "tags", postgresql_using="gin"),
        Index(
            "idx_posts_engagement_score", text("(like_count * 2 + view_count * 0.1)"),
            postgresql_where=text("is_published = true"),
        ),
    )


# The popular-posts query orders by exactly the indexed expression, written as SQL text: built from
# Python numbers, SQLAlchemy would send 2 and 0.1 as bind parameters, and `like_count * $1` is not
# the index's expression (the seed also ordered by a different formula than the one it indexed).
ENGAGEMENT: ColumnElement[Any] = literal_column("(posts.like_count * 2 + posts.view_count * 0.1)")


class UserFollow(Base):
    __tablename__ = "user_follows"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    follower_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    following_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (UniqueConstraint("follower_id", "following_id"),)


def asyncpg_url(dsn: str) -> str:
    """postgresql://... -> postgresql+asyncpg://..."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+asyncpg"):
        raise ValueError("not a PostgreSQL URL (expected postgresql://user@host:port/dbname)")
    return "postgresql+asyncpg://" + rest


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


async def seed_data(engine: AsyncEngine, *, users: int = 500, posts: int = 5000, follows: int = 2500) -> None:
    """Deterministic demo rows, generated inside PostgreSQL (fast even for large counts). The
    series is bigint: at the seed's scale (200k posts) `g * 104729` passes the int4 range."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO users (username, status, is_active, is_deleted, created_at) "
                "SELECT 'user' || g, (ARRAY['active','away','suspended'])[1 + g % 3], g % 10 <> 0, "
                "g % 50 = 0, now() - g * interval '1 hour' FROM generate_series(1::bigint, :n) g "
                "ON CONFLICT (username) DO NOTHING"
            ),
            {"n": users},
        )
        await conn.execute(
            text(
                "WITH u AS (SELECT array_agg(id ORDER BY id) AS ids FROM users) "
                "INSERT INTO posts (author_id, title, body, is_published, is_deleted, like_count, "
                "view_count, tags, created_at) "
                "SELECT u.ids[1 + g % cardinality(u.ids)], 'Post number ' || g, repeat('text ', 20), "
                "g % 4 <> 0, g % 37 = 0, (g * 7919) % 500, (g * 104729) % 20000, "
                "ARRAY['tag' || g % 20, 'topic' || g % 997], now() - g * interval '10 minutes' "
                "FROM u, generate_series(1::bigint, :n) g"
            ),
            {"n": posts},
        )
        await conn.execute(
            text(
                "WITH u AS (SELECT array_agg(id ORDER BY id) AS ids FROM users) "
                "INSERT INTO user_follows (follower_id, following_id) "
                "SELECT u.ids[1 + g % cardinality(u.ids)], u.ids[1 + (g * 7 + 3) % cardinality(u.ids)] "
                "FROM u, generate_series(1::bigint, :n) g "
                "WHERE g % cardinality(u.ids) <> (g * 7 + 3) % cardinality(u.ids) "
                "ON CONFLICT DO NOTHING"
            ),
            {"n": follows},
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE users, posts, user_follows"))


def popular_posts_query(limit: int) -> Select[int, str, str, int, int, datetime]:
    """The seed's popular-posts query, written so idx_posts_engagement_score serves it: the index's
    expression in ORDER BY, and `= true` (never `IS true`, which does not imply the index's
    predicate)."""
    return (
        select(
            Post.id, Post.title, User.username.label("author_username"),
            Post.like_count, Post.view_count, Post.created_at,
        )
        .join(User, Post.author_id == User.id)
        .where(Post.is_published == true(), Post.is_deleted == false())
        .order_by(ENGAGEMENT.desc())
        .limit(limit)
    )


class CachedUserRepository:
    """The seed's cached repository, returning plain data (never ORM objects). It never
    invalidates: ``cache.bind()`` does, on commit. An entry about a user carries that user's row
    tags (dropped when the user, or a post or follow that references the user, is written); the
    popular list carries the posts and users table tags (dropped by any write to them but a like
    or a view: those are declared counters, so the list may show a like count up to its TTL old)."""

    USER_STATS = "user_stats"
    POPULAR = "popular_posts"

    def __init__(self, session_factory: async_sessionmaker[AsyncSession], cache: CachingService) -> None:
        self.sessions = session_factory
        self.cache = cache
        if cache is not None:  # the uncached queries alone (the index advisor's tests) need none
            cache.bind(session_factory, counters=[Post.like_count, Post.view_count])

    async def get_user_with_stats(self, user_id: int) -> dict[str, Any] | None:
        """The uncached query. Counts come from separate subqueries: the seed joined posts and
        follows in one query, which multiplied one count by the other. `is_deleted = false` (not
        `IS false`) is what lets PostgreSQL match idx_posts_author_published_created's predicate."""
        posts = (
            select(
                func.count(Post.id).label("post_count"),
                func.coalesce(func.sum(Post.view_count), 0).label("total_views"),
                func.coalesce(func.sum(Post.like_count), 0).label("total_likes"),
            )
            .where(Post.author_id == user_id, Post.is_deleted == false())
            .subquery()
        )
        followers = (
            select(func.count().label("follower_count"))
            .select_from(UserFollow)
            .where(UserFollow.following_id == user_id)
            .scalar_subquery()
        )
        stmt = (
            select(
                User.id, User.username, User.status, User.is_active, User.created_at,
                posts.c.post_count, posts.c.total_views, posts.c.total_likes,
                followers.label("follower_count"),
            )
            .select_from(User)
            .join(posts, text("true"))
            .where(User.id == user_id, User.is_deleted == false())
        )
        async with self.sessions() as session:
            row = (await session.execute(stmt)).mappings().first()
        if row is None:
            return None
        return {
            "user": {
                "id": row["id"], "username": row["username"], "status": row["status"],
                "is_active": row["is_active"], "created_at": row["created_at"].isoformat(),
            },
            "stats": {
                "post_count": int(row["post_count"]),
                "follower_count": int(row["follower_count"]),
                "total_views": int(row["total_views"]),
                "total_likes": int(row["total_likes"]),
            },
        }

    async def get_user_with_stats_cached(self, user_id: int) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self.cache.get_or_load(
            self.USER_STATS, {"user_id": user_id}, lambda: self.get_user_with_stats(user_id),
            ttl=300, tags=row_tags(User, user_id),
        )
        return result

    async def get_popular_posts(self, limit: int) -> list[dict[str, Any]]:
        stmt = popular_posts_query(limit)
        async with self.sessions() as session:
            rows = (await session.execute(stmt)).mappings().all()
        return [{**row, "created_at": row["created_at"].isoformat()} for row in rows]

    async def get_popular_posts_cached(self, limit: int = 10) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.cache.get_or_load(
            self.POPULAR, {"limit": limit}, lambda: self.get_popular_posts(limit), ttl=600,
            tags=[table_tag(Post), table_tag(User)],
        )
        return result

    async def like_post(self, post_id: int) -> int | None:
        """A write: one more like (``like_count = like_count + 1`` in SQL). Through the unit of
        work, so the commit drops the author's cached stats: a bulk ``update()`` would not say
        whose post it was, and would drop every user's."""
        async with self.sessions.begin() as session:
            post = await session.get(Post, post_id)
            if post is None:
                return None
            post.like_count = Post.like_count + 1  # type: ignore[assignment]
            return post.author_id

    async def create_post(self, author_id: int, title: str, tags: list[str]) -> int:
        async with self.sessions.begin() as session:
            post = Post(author_id=author_id, title=title, tags=tags, is_published=True)
            session.add(post)
            await session.flush()
            post_id = post.id
        return post_id

    async def recent_posts(self, limit: int = 20) -> list[int]:
        """The newest published posts: served by idx_posts_published_only (its predicate and
        its key, read backwards)."""
        async with self.sessions() as session:
            rows = await session.execute(
                select(Post.id)
                .where(Post.is_published == true(), Post.is_deleted == false())
                .order_by(Post.created_at.desc())
                .limit(limit)
            )
            return list(rows.scalars())

    async def search_users(self, status: str, limit: int = 20) -> list[int]:
        """The newest active users in a status: served by idx_users_search_composite."""
        async with self.sessions() as session:
            rows = await session.execute(
                select(User.id)
                .where(User.status == status, User.is_active == true(), User.is_deleted == false())
                .order_by(User.created_at.desc())
                .limit(limit)
            )
            return list(rows.scalars())

    async def posts_with_tag(self, tag: str, limit: int = 20) -> list[int]:
        """Served by the GIN index (tags @> ARRAY[tag]) for a selective tag (a topic); a tag on
        one post in twenty is read faster through the primary key."""
        async with self.sessions() as session:
            rows = await session.execute(
                select(Post.id).where(Post.tags.contains([tag])).order_by(Post.id.desc()).limit(limit)
            )
            return list(rows.scalars())

    async def slow_title_search(self, term: str, pause: float = 0.2) -> int:
        """Deliberately slow: a sequential scan on an unindexed expression plus pg_sleep, so the
        slow-query panels have a clear top entry."""
        async with self.sessions() as session:
            n = await session.scalar(
                text("SELECT count(*) FROM posts, pg_sleep(:pause) WHERE lower(title) LIKE :pattern"),
                {"pause": pause, "pattern": f"%{term.lower()}%"},
            )
        return int(n or 0)


async def run_workload(
    engine: AsyncEngine, cache: CachingService, *, stop: asyncio.Event, rate: float = 20.0,
    seed: int | None = None, done: dict[str, int] | None = None,
) -> dict[str, int]:
    """A steady mix until ``stop`` is set: ~70% cached reads (user stats, popular posts), ~10%
    uncached reads (newest posts, user search, topic search; together with the cached loads they
    use each of the seed's five indexes), ~15% writes that invalidate, ~5% a slow query. Returns
    how many of each ran (kept up to date in ``done`` if given, so a caller can report progress)."""
    rnd = random.Random(seed)
    repo = CachedUserRepository(async_sessionmaker(engine, expire_on_commit=False), cache)
    async with engine.connect() as conn:
        user_ids = list((await conn.execute(select(User.id))).scalars())
        post_ids = list((await conn.execute(select(Post.id).limit(5000))).scalars())
    if not user_ids or not post_ids:
        raise RuntimeError("the blog has no data: call seed_data(engine) first")
    done = {} if done is None else done
    ops = ["user_stats", "popular", "recent", "user_search", "tag_search", "like", "new_post", "slow"]
    weights = [50, 15, 3, 3, 4, 12, 3, 5]
    interval = 1.0 / rate
    while not stop.is_set():
        started = time.monotonic()
        op = rnd.choices(ops, weights)[0]
        try:
            if op == "user_stats":
                # A skewed choice: a few hot users, so the hit ratio is realistic.
                await repo.get_user_with_stats_cached(user_ids[int(rnd.paretovariate(1.2)) % len(user_ids)])
            elif op == "popular":
                await repo.get_popular_posts_cached(rnd.choice((5, 10, 20)))
            elif op == "recent":
                await repo.recent_posts(rnd.choice((10, 20)))
            elif op == "user_search":
                await repo.search_users(rnd.choice(("active", "away", "suspended")))
            elif op == "tag_search":
                await repo.posts_with_tag(f"topic{rnd.randrange(997)}")
            elif op == "like":
                await repo.like_post(rnd.choice(post_ids))
            elif op == "new_post":
                await repo.create_post(rnd.choice(user_ids), f"Fresh post {rnd.randrange(10**6)}", ["tag1", "new"])
            else:
                await repo.slow_title_search(f"number {rnd.randrange(100)}")
            done[op] = done.get(op, 0) + 1
        except Exception as e:  # the demo keeps going through a database restart
            log.warning("demo workload: %s failed: %r", op, e)
            done["failed"] = done.get("failed", 0) + 1
        pause = interval - (time.monotonic() - started)
        if pause > 0:
            try:
                await asyncio.wait_for(stop.wait(), pause)
            except TimeoutError:
                pass
    return done


async def run_demo_workload(
    dsn: str, redis_url: str, stop: asyncio.Event, *, rate: float = 20.0, stats_key: str = "pgcache:stats",
    done: dict[str, int] | None = None,
) -> None:
    """What `pgcache-exporter demo` runs beside the daemon: schema, data (once), then the workload."""
    engine = create_async_engine(asyncpg_url(dsn), pool_size=5)
    try:
        await create_schema(engine)
        async with engine.connect() as conn:
            empty = (await conn.scalar(select(func.count()).select_from(User))) == 0
        if empty:
            await seed_data(engine)
        async with CachingService(redis_url, stats_key=stats_key, instance="demo") as cache:
            await run_workload(engine, cache, stop=stop, rate=rate, done=done)
    finally:
        await engine.dispose()
