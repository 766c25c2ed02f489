"""The web console under /console: a playground for the chat API and a live operations page.

Server-rendered pages (Jinja templates) with a little plain JavaScript and CSS served by the router itself;
the browser never loads anything from another origin. A user signs in with an API key, which becomes a
signed, expiring, httpOnly SameSite=Strict session cookie (session.py); every action goes through JSON
endpoints that check it (pages.py), and chat goes through the real POST /v1/chat/completions, so keys,
quotas, the answer cache, metrics and the audit log all apply. The operations page reads the same sources
as /metrics (live.py: the router's own metrics registry, the replica pool, and the GPU exporters), and
the autoscaler's status from the registry's Redis (autoscaling.py).
"""
