"""segment-relay: Segment's HTTP Tracking API in front of an Infinario-style customer data API."""

__version__ = "0.1.0"
