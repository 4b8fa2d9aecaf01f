"""The admin console: server-rendered pages for every admin task (sessions: api/admin_page.py)."""

from fastapi import APIRouter

from api.console import analytics, assets, customers, payments, payouts, referrals

router = APIRouter(include_in_schema=False)
for area in (assets, customers, referrals, payouts, payments, analytics):
    router.include_router(area.router)
