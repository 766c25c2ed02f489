"""The OpenAI-compatible router: `create_app(settings)` in router.app, served by router.server."""
