"""Prefect flows over the `dalle` library, one module per pipeline stage."""

import os

# Before Prefect is imported: its server telemetry would keep trying to reach the network.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
