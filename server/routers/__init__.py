"""The app's endpoints, one router per concern: classify, health, stats/admin, metrics, Open Inference Protocol
v2, the page at /."""
from . import classify, health, metrics, page, stats, v2

ROUTERS = (classify.router, health.router, stats.router, metrics.router, v2.health, v2.router, page.router)
