"""Serving generations: a generation's settings, batched decoding and the web server with its API."""
