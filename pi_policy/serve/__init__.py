"""The openpi-compatible policy server: openpi's own websocket clients talk to this project's runner unchanged."""
