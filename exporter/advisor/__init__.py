"""The index advisor: missing indexes found from the statements that cost the most, each proven
with the planner and a hypothetical index (HypoPG), never a real one.

Light on purpose: the parser (pglast) is imported only when the advisor runs, so a daemon with
the advisor disabled does not load it. `config` is imported first because it imports
`advisor.settings`, which subclasses its CollectorSettings.
"""

from .. import config as _config  # noqa: F401  (import order: see above)

__all__: list[str] = []
