"""Development tools, not part of the installed runtime: the dashboards preview and its local Prometheus."""
