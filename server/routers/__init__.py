"""The app's endpoints, one router per concern (classify, health, stats/admin, metrics)."""
from . import classify, health, metrics, stats

ROUTERS = (classify.router, health.router, stats.router, metrics.router)
