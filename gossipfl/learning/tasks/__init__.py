"""The built-in tasks: digits (MLP, CNN), synthetic, tabular (CSV)."""
