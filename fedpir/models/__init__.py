"""PIR network, task heads, anchor alignment."""
