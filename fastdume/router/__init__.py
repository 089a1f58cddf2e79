"""Router statistics (stats), collecting them under forced routing (collect) and the
closed-form fit (solve)."""

from fastdume.router.collect import collect_stats
from fastdume.router.fingerprint import check_model, shared_fingerprint
from fastdume.router.solve import LAM_MODES, fit_router, solve_router
from fastdume.router.stats import FORMAT, FORMAT_VERSION, RouterStats

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LAM_MODES",
    "RouterStats",
    "check_model",
    "collect_stats",
    "fit_router",
    "shared_fingerprint",
    "solve_router",
]
