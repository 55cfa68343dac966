"""Admin console and API: policy versions (policies/store.py), try-it, live calls, softphone.

bot/app.py mounts `bot.admin.api.router` under /admin (console) and /admin/api (API). docs/admin.md.
"""
