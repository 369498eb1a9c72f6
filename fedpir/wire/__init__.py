"""The wire format: message keys, site error codes and how weights are encoded."""
