"""Patient-level DP-SGD (Opacus), the site's privacy budget and its ledger."""
